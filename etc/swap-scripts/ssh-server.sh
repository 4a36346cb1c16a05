#!/bin/sh
# ssh-server.sh: run a model server on another host as a managed model.
#
# Usage (a model's command in Jano's config):
#     [[models]]
#     name = "qwen-chat"
#     upstream = "http://gpu-box:{port}"
#     command = ["etc/swap-scripts/ssh-server.sh", "gpu-box",
#                "llama-server", "-m", "/models/qwen.gguf", "--host", "0.0.0.0", "--port", "{port}"]
#
# Jano runs this script as it runs any managed server: in a process group of
# its own, SIGTERM to stop it, SIGKILL after stop_timeout.  The script becomes
# `ssh -tt HOST exec SERVER ARGS...`: the forced terminal ties the remote
# server to the connection, so when Jano stops (or kills) ssh, the remote side
# hangs up and the server gets SIGHUP and exits; its output comes back over
# the connection into Jano's log ring (`GET /logs/<model>`).  If the network
# drops, ServerAlive* ends ssh within ~15 s and Jano sees a crash.
#
# Needs: key-based ssh login for Jano's user (BatchMode: no password prompt),
# and the port reachable from Jano's host (allocated from processes.port_range
# on Jano's side: keep that range open on the remote host's firewall).
#
# Settings (environment, e.g. models[].env):
#     SSH            the ssh command      (default: ssh)
#     SSH_OPTIONS    extra ssh options    (default: none), e.g. "-i /etc/jano/id_ed25519"

set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 HOST SERVER [ARGS...]" >&2
    exit 2
fi
host=$1
shift

# Quote each argument for the remote shell: 'it'\''s' style, so spaces and
# quotes in model paths survive the trip.
quoted=
for arg in "$@"; do
    quoted="$quoted '$(printf '%s' "$arg" | sed "s/'/'\\\\''/g")'"
done

# ${SSH_OPTIONS} is unquoted on purpose: it may hold several options.
# shellcheck disable=SC2086
exec ${SSH:-ssh} -tt -o BatchMode=yes -o ServerAliveInterval=5 -o ServerAliveCountMax=3 \
    ${SSH_OPTIONS:-} "$host" "exec$quoted"
