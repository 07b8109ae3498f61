#!/usr/bin/env bash
# Runs the Postman collection of this folder with newman against `sigproxy demo`:
# starts the demo on a free port, waits for it, points the collection's baseUrl at it,
# runs newman, stops the demo with SIGINT, and exits with newman's status.
#
#   examples/postman/run-newman.sh [COLLECTION]     # from any directory
#
# Needs node/npm and sigproxy installed (`pip install -e .`). newman 6 is installed
# with npm on first use into NEWMAN_PREFIX (default: ~/.cache/sigproxy-newman, outside
# the checkout), unless a newman 6 is already on PATH.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
collection=$(realpath "${1:-$here/sigproxy-demo.postman_collection.json}")
environment=$here/sigproxy-demo.postman_environment.json
python=${PYTHON:-$(command -v python || command -v python3 || true)}
newman_prefix=${NEWMAN_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/sigproxy-newman}
ready_timeout=30   # seconds for the demo to print its instructions
stop_timeout=15    # seconds for the demo to exit after SIGINT before it is killed

if [[ -z $python ]]; then
  echo "run-newman: no python found; set PYTHON to the one sigproxy is installed in" >&2
  exit 1
fi

# --- newman -----------------------------------------------------------------------
if command -v newman >/dev/null && [[ $(newman --version) == 6.* ]]; then
  newman=$(command -v newman)
else
  newman=$newman_prefix/node_modules/.bin/newman
  if [[ ! -x $newman ]]; then
    echo "run-newman: installing newman@6 into $newman_prefix" >&2
    mkdir -p "$newman_prefix"
    npm install --no-save --no-audit --no-fund --loglevel=error \
      --prefix "$newman_prefix" newman@6 >&2
  fi
fi
echo "run-newman: newman $("$newman" --version) ($newman)" >&2

# --- the demo ---------------------------------------------------------------------
work=$(mktemp -d)
demo_pid=
demo_ready=0
# shellcheck disable=SC2329  # called by cleanup, from the EXIT trap
stop_demo() {
  if [[ -n $demo_pid ]] && kill -0 "$demo_pid" 2>/dev/null; then
    # SIGINT, as Ctrl-C would. Until the demo is ready it has not installed its own
    # handler yet and a background job of a non-interactive shell ignores SIGINT, so a
    # demo still starting gets SIGTERM (Python's default for it ends the process).
    local sig=INT
    (( demo_ready )) || sig=TERM
    kill -"$sig" "$demo_pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$demo_pid" 2>/dev/null && (( waited < stop_timeout * 10 )); do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$demo_pid" 2>/dev/null; then
      echo "run-newman: the demo did not stop ${stop_timeout}s after SIG$sig; killing it" >&2
      kill -KILL "$demo_pid" 2>/dev/null || true
    fi
  fi
  if [[ -n $demo_pid ]]; then
    wait "$demo_pid" 2>/dev/null || true
  fi
  demo_pid=
}
# shellcheck disable=SC2329  # the EXIT trap
cleanup() {
  stop_demo
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_demo_log() {
  echo "--- demo stdout ---" >&2
  cat "$work/demo.out" >&2 || true
  echo "--- demo stderr (last 40 lines) ---" >&2
  tail -n 40 "$work/demo.err" >&2 || true
}

# Started from the checkout so that its sigproxy and examples/ are the ones used.
(cd "$repo" && exec "$python" -m sigproxy demo --port 0) >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!

deadline=$((SECONDS + ready_timeout))
until grep -q '^Ctrl-C stops the proxy and the six functions\.' "$work/demo.out"; do
  if ! kill -0 "$demo_pid" 2>/dev/null; then
    echo "run-newman: sigproxy demo exited before it was ready" >&2
    show_demo_log
    exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "run-newman: sigproxy demo was not ready within ${ready_timeout}s" >&2
    show_demo_log
    exit 1
  fi
  sleep 0.1
done
demo_ready=1

# The line "  curl 'http://127.0.0.1:PORT/hello?name=John'" names the proxy.
base=$(sed -n "s|^ *curl '\(http://[^']*\)/hello?name=John'.*|\1|p" "$work/demo.out" | head -n 1)
if [[ -z $base ]]; then
  echo "run-newman: no proxy URL found in the demo's output" >&2
  show_demo_log
  exit 1
fi
echo "run-newman: sigproxy demo listening at $base" >&2

# --- newman -----------------------------------------------------------------------
color=auto
[[ -t 1 ]] || color=off   # no escape codes in CI logs
status=0
"$newman" run "$collection" -e "$environment" --env-var "baseUrl=$base" \
  --reporters cli --color "$color" --timeout-request 10000 || status=$?

if (( status != 0 )); then
  echo "run-newman: newman exited with status $status" >&2
  show_demo_log
fi
exit "$status"
