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
# Run Ollama with OLLAMA_MAX_LOADED_MODELS=1, so that it never keeps two
# models on the GPU even when a request for another model slips past Jano,
# and so that a failed unload cannot leave two models loaded.
#
# Settings (environment):
#     OLLAMA_URL    Ollama's base URL (default: JANO_UPSTREAM, else
#                   http://$OLLAMA_HOST, else http://127.0.0.1:11434)
#     CURL_OPTS     extra curl options, split on spaces (no quoting),
#                   e.g. "--max-time 600" or "-K /etc/jano/curlrc"

set -eu

model=${1:-${JANO_MODEL:-}}
previous=${2-${JANO_PREVIOUS_MODEL:-}}

if [ -z "$model" ]; then
    echo "usage: $0 MODEL [PREVIOUS]" >&2
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
