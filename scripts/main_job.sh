#!/usr/bin/env bash
# The main job (`make demo`): serve SmolLM2-135M-Instruct with the DiffKV KV pool on this CPU machine and run
# the examples against it.
#
#   1. make model                     convert the bundled GGUF once (.cache/models/smollm2-135m-instruct)
#   2. python -m sglang.launch_server --kv-pool diffkv --enable-metrics --enable-cache-report, CPU flags,
#      from a temporary directory, log in .cache/main_job/server.log; wait for /health (<= 5 min)
#   3. examples/multi_turn_chat.py    4 turns, cached tokens and KV bytes per turn
#   4. examples/frontend_fork.py      a frontend program whose two forks share a cached prefix
#   5. stop the server (its whole process group; also on errors and Ctrl-C) and print a summary
#
# `make demo` runs `make setup` first; this script assumes the .venv exists (it runs bootstrap otherwise).
# Environment: DEMO_PORT (default 30000, a free port is taken if it is busy), DEMO_MAX_TOTAL_TOKENS (16384),
# DEMO_STARTUP_TIMEOUT seconds (300), MODEL (smollm2-135m-instruct).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-smollm2-135m-instruct}"
PORT="${DEMO_PORT:-30000}"
MAX_TOTAL_TOKENS="${DEMO_MAX_TOTAL_TOKENS:-16384}"
STARTUP_TIMEOUT="${DEMO_STARTUP_TIMEOUT:-300}"
LOG_DIR="$ROOT/.cache/main_job"
LOG="$LOG_DIR/server.log"

T_START=$SECONDS
step() { printf '\n==== [main_job %4ds] %s\n' "$((SECONDS - T_START))" "$*"; }
die() { printf '[main_job] ERROR: %s\n' "$*" >&2; exit 1; }

SERVER_PID=""
WORKDIR=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        printf '[main_job] stopping the server (process group %s)\n' "$SERVER_PID"
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do                         # until no process of the group is left
            kill -0 -- "-$SERVER_PID" 2>/dev/null || kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 1
        done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    [ -n "$WORKDIR" ] && rm -rf "$WORKDIR"
    WORKDIR=""
}
on_exit() {
    local rc=$?
    stop_server
    if [ "$rc" -ne 0 ]; then
        printf '[main_job] failed (exit %s); server log: %s\n' "$rc" "$LOG" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'printf "\n[main_job] interrupted\n" >&2; exit 130' INT
trap 'exit 143' TERM

[ -x "$PY" ] || bash scripts/bootstrap.sh

# ---------------------------------------------------------------------------------------------- model
step "make model ($MODEL)"
T0=$SECONDS
mkdir -p "$LOG_DIR"
make --no-print-directory model MODEL="$MODEL" >"$LOG_DIR/model.txt"   # progress goes to stderr
cat "$LOG_DIR/model.txt"
MODEL_DIR="$(tail -n 1 "$LOG_DIR/model.txt")"                        # prepare_model prints the directory last
[ -f "$MODEL_DIR/config.json" ] || die "make model did not print a model directory (got '$MODEL_DIR')"
T_MODEL=$((SECONDS - T0))
echo "model: $MODEL_DIR (${T_MODEL}s)"

# --------------------------------------------------------------------------------------------- server
port_busy() {
    "$PY" -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' "$1"
}
if port_busy "$PORT"; then
    NEW_PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    echo "port $PORT is busy; using $NEW_PORT"
    PORT="$NEW_PORT"
fi
BASE_URL="http://127.0.0.1:$PORT"

step "starting the server on $BASE_URL (log: ${LOG#"$ROOT"/})"
WORKDIR="$(mktemp -d -t diffkv-main-job.XXXXXX)"   # never the repo root: its kernels/ folder must not shadow PyPI's
SERVER_CMD=("$PY" -m sglang.launch_server --model-path "$MODEL_DIR" --host 127.0.0.1 --port "$PORT"
    --kv-pool diffkv --enable-metrics --enable-cache-report
    --device cpu --disable-overlap-schedule --skip-server-warmup --sampling-backend pytorch
    --max-total-tokens "$MAX_TOTAL_TOKENS")
echo "${SERVER_CMD[*]#"$ROOT"/}"
T0=$SECONDS
(
    cd "$WORKDIR"
    unset SGLANG_DIFFKV_POOL SGLANG_DIFFKV_CONFIG
    export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1
    export PYTHONPATH="$ROOT/diffkv_devtools/cpu_shims${PYTHONPATH:+:$PYTHONPATH}"   # CPU stand-ins (dev-only shims)
    # a new session, so the server leads its own process group and stopping it reaches every SGLang
    # subprocess (under job control the subshell already leads its group and setsid() is refused)
    exec "$PY" -c 'import os, sys
try:
    os.setsid()
except PermissionError:
    pass
os.execv(sys.argv[1], sys.argv[1:])' "${SERVER_CMD[@]}"
) >"$LOG" 2>&1 &
SERVER_PID=$!
disown "$SERVER_PID"        # no job report from bash when the launcher SIGKILLs itself on shutdown
sleep 1
PGID="$(ps -o pgid= -p "$SERVER_PID" 2>/dev/null | tr -d ' ')"
if [ -n "$PGID" ] && [ "$PGID" != "$SERVER_PID" ]; then
    die "the server is not the leader of its own process group (pgid $PGID); stopping it"
fi

printf 'waiting for /health '
while true; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        SERVER_PID=""
        printf '\n'
        tail -n 40 "$LOG" >&2
        die "the server exited during start-up; log above and in $LOG"
    fi
    if curl -fsS -m 5 "$BASE_URL/health" >/dev/null 2>&1; then
        break
    fi
    if [ $((SECONDS - T0)) -ge "$STARTUP_TIMEOUT" ]; then
        printf '\n'
        tail -n 40 "$LOG" >&2
        die "the server was not healthy after ${STARTUP_TIMEOUT}s; log tail above"
    fi
    printf '.'
    sleep 3
done
T_STARTUP=$((SECONDS - T0))
printf ' up after %ss\n' "$T_STARTUP"
grep -m1 "DiffKV pool selected" "$LOG" | sed 's/^\[[^]]*\] /  /' || true

# ------------------------------------------------------------------------------------------- examples
step "examples/multi_turn_chat.py --base-url $BASE_URL"
T0=$SECONDS
CHAT_OUT="$LOG_DIR/multi_turn_chat.txt"
"$PY" examples/multi_turn_chat.py --base-url "$BASE_URL" | tee "$CHAT_OUT"
T_CHAT=$((SECONDS - T0))

step "examples/frontend_fork.py --base-url $BASE_URL"
T0=$SECONDS
FORK_OUT="$LOG_DIR/frontend_fork.txt"
"$PY" examples/frontend_fork.py --base-url "$BASE_URL" | tee "$FORK_OUT"
T_FORK=$((SECONDS - T0))

# the pool's gauges once both examples are done (the radix tree still holds their prefixes)
sleep 1
FINAL_KV="$("$PY" examples/multi_turn_chat.py --base-url "$BASE_URL" --kv-only)" || FINAL_KV="(could not read /metrics)"
step "stopping the server"
stop_server

# -------------------------------------------------------------------------------------------- summary
# tracebacks after start-up (before it, the launcher's post-warmup /freeze_gc call can race the HTTP server
# under --skip-server-warmup and log a harmless traceback) and the pool's own errors
ERRORS="$(sed -n '/The server is fired up/,$p' "$LOG" | grep -cE "Traceback|cannot stage|ArenaOutOfMemory" || true)"
step "summary"
echo "model           : $MODEL_DIR"
echo "timings         : model ${T_MODEL}s, server start ${T_STARTUP}s, multi-turn chat ${T_CHAT}s," \
     "fork ${T_FORK}s, total $((SECONDS - T_START))s"
echo "chat            : $(grep -m1 "^prompt tokens over" "$CHAT_OUT" || echo "(no summary line)")"
echo "chat KV         : $(grep -m1 "^KV held now" "$CHAT_OUT" || echo "(no KV line)")"
echo "fork            : $(tail -n 1 "$FORK_OUT")"
echo "KV at the end   : (/metrics after both examples; the radix tree still holds their prefixes)"
echo "$FINAL_KV" | sed 's/^/                  /'
echo "server log      : ${LOG#"$ROOT"/} ($ERRORS tracebacks / pool errors after start-up)"
echo "outputs         : ${CHAT_OUT#"$ROOT"/}, ${FORK_OUT#"$ROOT"/}"
