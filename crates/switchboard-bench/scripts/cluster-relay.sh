#!/usr/bin/env bash
# Cross-node relay benchmark (issue #6): one redis-server on a free loopback
# port, NODES switchboard nodes sharing it (backend = "redis"), each on a
# free port (--listen 127.0.0.1:0), then `switchboard-bench relay` with one
# --url per node (clients spread round-robin, so with 3 nodes about two
# thirds of the messages cross nodes) and every node's PID and Redis's as
# --server-pid (their CPU times add up). Everything it started is stopped
# on exit. Extra arguments go to `switchboard-bench relay`.
#
#   crates/switchboard-bench/scripts/cluster-relay.sh -n 300 -k 4 --duration 10
#   NODES=1 crates/switchboard-bench/scripts/cluster-relay.sh -n 300 ...   # one node, Redis backend
#   NODES=0 crates/switchboard-bench/scripts/cluster-relay.sh -n 300 ...   # one node, memory backend, no Redis
#
# Needs redis-server 7 or later; builds nothing (run
# `cargo build --release -p switchboard-cli -p switchboard-bench` first).
set -euo pipefail
cd "$(dirname "$0")/../../.."

NODES=${NODES:-3}
BIN=${BIN:-target/release/switchboard}
BENCH=${BENCH:-target/release/switchboard-bench}
LOGS=${LOGS:-$(mktemp -d -t switchboard-cluster-bench-XXXXXX)}
SERVER_ARGS=${SERVER_ARGS:---max-message-rate 0}

for b in "$BIN" "$BENCH"; do
  [ -x "$b" ] || { echo "$b is missing: cargo build --release -p switchboard-cli -p switchboard-bench" >&2; exit 2; }
done

pids=()
redis_pid=
cleanup() {
  trap - EXIT INT TERM
  if [ "${#pids[@]}" -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if [ -n "$redis_pid" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  echo "logs in $LOGS" >&2
}
trap cleanup EXIT INT TERM

# True when something accepts connections on 127.0.0.1:$1.
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redis_args=()
if [ "$NODES" -gt 0 ]; then
  command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 2; }
  # A free port: try a few random ones (bounded), keep the first Redis that
  # comes up.
  for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 20000))
    answers "$port" && continue
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      >"$LOGS/redis.log" 2>&1 &
    redis_pid=$!
    for _ in $(seq 1 50); do
      answers "$port" && break
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$redis_pid" 2>/dev/null && answers "$port"; then
      REDIS_PORT=$port
      break
    fi
    redis_pid=
  done
  [ -n "${REDIS_PORT:-}" ] || { echo "could not start redis-server on a free port" >&2; exit 2; }
  redis_args=(--backend redis --redis-url "redis://127.0.0.1:$REDIS_PORT/" --redis-key-prefix bench)
  echo "redis-server pid $redis_pid on 127.0.0.1:$REDIS_PORT" >&2
fi

count=$((NODES > 0 ? NODES : 1))
urls=()
for i in $(seq 1 "$count"); do
  node_args=()
  [ "$NODES" -gt 0 ] && node_args=("${redis_args[@]}" --node-id "n$i")
  # shellcheck disable=SC2086 # SERVER_ARGS is a list of words
  "$BIN" --listen 127.0.0.1:0 $SERVER_ARGS "${node_args[@]}" 2>"$LOGS/node-$i.log" &
  pids+=($!)
done
for i in $(seq 1 "$count"); do
  addr=
  for _ in $(seq 1 100); do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$LOGS/node-$i.log" | head -1 | sed 's|.*http://||') || true
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "node $i did not start; see $LOGS/node-$i.log" >&2; exit 2; }
  urls+=(--url "ws://$addr/ws")
  echo "node n$i pid ${pids[$((i - 1))]} on $addr" >&2
done

server_pids=()
for p in "${pids[@]}"; do server_pids+=(--server-pid "$p"); done
[ -n "$redis_pid" ] && server_pids+=(--server-pid "$redis_pid")

set +e
timeout 600 "$BENCH" relay "${urls[@]}" "${server_pids[@]}" "$@"
rc=$?
set -e
exit $rc
