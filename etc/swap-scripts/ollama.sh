#!/bin/sh
# ollama.sh: swap models inside one Ollama server with keep_alive.
#
# Usage (Jano's [swap] command):
#     command = ["etc/swap-scripts/ollama.sh", "{model}", "{previous}"]
#
# Contract: see etc/swap-model.example.sh.  $1 is the model to load, $2 the
# model to unload (empty: unknown); JANO_MODEL / JANO_PREVIOUS_MODEL are used
# when the arguments are missing.  Exit 0 once Ollama has loaded the model.
#
# What it does, with Ollama's own API:
#   1. unload the previous model:  POST /api/generate {"model": PREV, "keep_alive": 0}
#      (previous unknown: every model listed by GET /api/ps, when jq is installed);
#   2. preload the new one:        POST /api/generate {"model": NEXT, "keep_alive": -1}
#      which answers {"done":true,"done_reason":"load"} once the model is loaded.
#      keep_alive -1 keeps it loaded until Jano unloads it.
#
# Unload ($1 empty, or JANO_ACTION=unload; the same [swap] command serves):
# step 1 for the previous model only, then wait until GET /api/ps no longer
# lists it (Ollama frees the memory after answering), and load nothing.  A
# model Ollama does not know (404) is not loaded: exit 0.  With no previous
# model either, it unloads every model /api/ps lists (when jq is installed),
# as a best effort that exits 0 whatever happens.
#
# Run Ollama with OLLAMA_MAX_LOADED_MODELS=1, so that it never keeps two
# models on the GPU even when a request for another model slips past Jano,
# and so that a failed unload cannot leave two models loaded.
#
# Settings (environment):
#     OLLAMA_URL    Ollama's base URL (default: JANO_UPSTREAM, else
#                   http://$OLLAMA_HOST, else http://127.0.0.1:11434)
#     CURL_OPTS     extra curl options, split on spaces (no quoting),
#                   e.g. "--max-time 600" or "-K /etc/jano/curlrc"
#     OLLAMA_UNLOAD_TIMEOUT  seconds an unload waits for the model to leave
#                   /api/ps before it fails (default: 60)

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

# An unload: JANO_ACTION=unload, or an empty model argument.  The model to
# unload is $2, else JANO_PREVIOUS_MODEL (else $1, for a "[swap] unload"
# command that passes only "{model}").
unload=
if [ "${JANO_ACTION:-}" = unload ] || { [ -z "$model" ] && [ $# -gt 0 ]; }; then
    unload=yes
    previous=${previous:-${JANO_PREVIOUS_MODEL:-$model}}
    model=
elif [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]  (to unload: $0 '' PREVIOUS)" >&2
    exit 2
fi

if [ -n "${OLLAMA_URL:-}" ]; then
    base=$OLLAMA_URL
elif [ -n "${JANO_UPSTREAM:-}" ]; then
    base=$JANO_UPSTREAM
elif [ -n "${OLLAMA_HOST:-}" ]; then
    case $OLLAMA_HOST in
        *://*) base=$OLLAMA_HOST ;;
        *) base=http://$OLLAMA_HOST ;;
    esac
else
    base=http://127.0.0.1:11434
fi
base=${base%/}
# A JANO_UPSTREAM may end in /v1 when the model is used through Ollama's
# OpenAI-compatible API: the native API lives at the root.
base=${base%/v1}

body=$(mktemp)
trap 'rm -f "$body"' EXIT

# A JSON string literal for $1 (escapes backslashes and double quotes).
json_string() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

# POST $2 (JSON) to $base$1; the body goes to $body, the status to stdout
# ("000" when Ollama cannot be reached).
post() {
    # shellcheck disable=SC2086
    curl -sS ${CURL_OPTS:-} -o "$body" -w '%{http_code}' -X POST \
        -H 'Content-Type: application/json' --data "$2" "$base$1" || true
}

unload() {
    echo "unloading $1"
    status=$(post /api/generate "{\"model\":$(json_string "$1"),\"keep_alive\":0}")
    case $status in
        200) ;;
        # A model that does not exist (404) is not loaded either.
        404) echo "$1 is not known to Ollama: nothing to unload" ;;
        # Not fatal: with OLLAMA_MAX_LOADED_MODELS=1 Ollama evicts it anyway
        # when the next model loads.
        *) echo "warning: unloading $1 answered $status: $(cat "$body")" >&2 ;;
    esac
}

# Does GET /api/ps list model $1?  Prints yes, no, or unknown (no answer).
# Ollama lists "name:latest" for a model asked for as "name".
listed() {
    # shellcheck disable=SC2086
    listing=$(curl -sS -f ${CURL_OPTS:-} "$base/api/ps" 2>/dev/null) || { echo unknown; return 0; }
    listing=$(printf '%s' "$listing" | tr -d ' \t\r\n')
    set -- "$1" "$1:latest"
    case ${1##*/} in *:*) set -- "$1" ;; esac
    for candidate in "$@"; do
        quoted=$(json_string "$candidate")
        case $listing in
            *"\"name\":$quoted"*|*"\"model\":$quoted"*) echo yes; return 0 ;;
        esac
    done
    echo no
}

# Unload model $1 and wait until Ollama no longer lists it, so that its
# memory is free.  Returns 1, the reason on stderr, when that fails.
unload_and_wait() {
    echo "unloading $1"
    status=$(post /api/generate "{\"model\":$(json_string "$1"),\"keep_alive\":0}")
    case $status in
        200) ;;
        404) echo "$1 is not known to Ollama: nothing to unload"; return 0 ;;
        000) echo "cannot reach Ollama at $base" >&2; return 1 ;;
        *)
            error=$(sed -n -e 's/.*"error": *"\([^"]*\)".*/\1/p' "$body")
            echo "Ollama could not unload $1 (HTTP $status): ${error:-$(head -c 300 "$body")}" >&2
            return 1 ;;
    esac
    tries=0
    while :; do
        case $(listed "$1") in
            no) echo "$1 unloaded"; return 0 ;;
            unknown)
                echo "warning: cannot read $base/api/ps: not waiting for $1 to leave memory" >&2
                return 0 ;;
        esac
        if [ "$tries" -ge $((${OLLAMA_UNLOAD_TIMEOUT:-60} * 4)) ]; then
            echo "Ollama still lists $1 ${OLLAMA_UNLOAD_TIMEOUT:-60}s after unloading it (GET /api/ps)" >&2
            return 1
        fi
        tries=$((tries + 1))
        sleep 0.25
    done
}

# Unload: unload the previous model, load nothing.
if [ -n "$unload" ]; then
    if [ -n "$previous" ]; then
        unload_and_wait "$previous" || exit 1
        exit 0
    fi
    # Nothing known to be loaded: unload whatever Ollama holds, best effort.
    if ! command -v jq >/dev/null 2>&1; then
        echo "unload: nothing known to be loaded and jq not installed: nothing to do"
        exit 0
    fi
    loaded=$(curl -sS ${CURL_OPTS:-} "$base/api/ps" | jq -r '.models[]?.name' 2>/dev/null || true)
    if [ -z "$loaded" ]; then
        echo "unload: nothing known to be loaded, and Ollama at $base lists no model"
    fi
    for name in $loaded; do
        unload_and_wait "$name" || echo "warning: $name may still be loaded" >&2
    done
    exit 0
fi

# 1. Unload what holds the GPU.
if [ -z "$previous" ]; then
    if command -v jq >/dev/null 2>&1; then
        loaded=$(curl -sS ${CURL_OPTS:-} "$base/api/ps" | jq -r '.models[]?.name' 2>/dev/null || true)
        for name in $loaded; do
            [ "$name" = "$model" ] || unload "$name"
        done
    else
        echo "previous model unknown and jq not installed: relying on OLLAMA_MAX_LOADED_MODELS=1"
    fi
elif [ "$previous" != "$model" ]; then
    unload "$previous"
fi

# 2. Load the new model and keep it loaded.
echo "loading $model"
status=$(post /api/generate "{\"model\":$(json_string "$model"),\"keep_alive\":-1}")
if [ "$status" != 200 ]; then
    if [ "$status" = 000 ]; then
        echo "cannot reach Ollama at $base" >&2
    else
        # Ollama's errors look like {"error":"model 'x' not found"}.
        error=$(sed -n -e 's/.*"error": *"\([^"]*\)".*/\1/p' "$body")
        echo "Ollama could not load $model (HTTP $status): ${error:-$(head -c 300 "$body")}" >&2
    fi
    exit 1
fi
if ! grep -q '"done": *true' "$body"; then
    echo "Ollama answered without loading $model: $(head -c 300 "$body")" >&2
    exit 1
fi

echo "$model loaded"
exit 0
