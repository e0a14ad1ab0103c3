#!/usr/bin/env bash
# A local Switchboard cluster: one redis-server and three switchboard nodes,
# all on loopback, sharing that Redis (backend = "redis"). Prints what to try,
# then runs until Ctrl-C, which stops everything it started.
#
#   scripts/cluster-demo.sh                    # ports 8081-8083, Redis on 6390
#   REDIS_PORT=6400 BASE_PORT=9001 scripts/cluster-demo.sh
#   PROFILE=debug scripts/cluster-demo.sh      # a debug build (faster to build)
#   LOGS=/tmp/demo-logs scripts/cluster-demo.sh  # logs there (created if missing)
#
# Needs redis-server 7 or later (Debian/Ubuntu: apt-get install -y redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=${REDIS_PORT:-6390}
BASE_PORT=${BASE_PORT:-8081}
PROFILE=${PROFILE:-release}
LOGS=${LOGS:-$(mktemp -d -t switchboard-cluster-XXXXXX)}
mkdir -p "$LOGS"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is not installed: apt-get install -y redis-server" >&2
  exit 1
fi

if [ "$PROFILE" = release ]; then
  cargo build --release -p switchboard-cli
else
  cargo build -p switchboard-cli
fi
BIN="target/$PROFILE/switchboard"

redis_pid=
pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ "${#pids[@]}" -gt 0 ]; then
    # SIGTERM: the nodes close their clients with 1001 and leave the
    # cluster (while Redis is still there), then Redis stops.
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if [ -n "$redis_pid" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  echo "stopped; logs in $LOGS"
}
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  >"$LOGS/redis.log" 2>&1 &
redis_pid=$!

# Wait (bounded) until a port answers.
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing answers on port $1; logs in $LOGS" >&2
  exit 1
}
wait_port "$REDIS_PORT"

for i in 1 2 3; do
  port=$((BASE_PORT + i - 1))
  "$BIN" --listen "127.0.0.1:$port" \
    --backend redis \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/" \
    --node-id "node-$i" \
    --redis-key-prefix demo \
    >"$LOGS/node-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  wait_port $((BASE_PORT + i - 1))
done

A=$BASE_PORT
B=$((BASE_PORT + 1))
C=$((BASE_PORT + 2))
cat <<EOF

Redis on 127.0.0.1:$REDIS_PORT, nodes node-1, node-2, node-3 on
http://127.0.0.1:$A, :$B and :$C (logs in $LOGS).

Connect clients to different nodes, e.g. in browser consoles:
  const one = new WebSocket("ws://127.0.0.1:$A/ws?id=1"); one.onmessage = (e) => console.log("1 got", e.data);
  const two = new WebSocket("ws://127.0.0.1:$C/ws?id=2"); two.onopen = () => two.send(JSON.stringify({targets: [1], payload: "from node-3"}));

or from a shell, with any node doing the work:
  curl -s localhost:$B/api/connections                   # the whole cluster ("scope":"cluster")
  curl -s localhost:$B/api/send -H 'Content-Type: application/json' -d '{"targets":[1,2,3],"payload":"hi"}'
  curl -s localhost:$A/api/publish -H 'Content-Type: application/json' -d '{"topic":"chat","payload":"to every /chat client"}'
  curl -s -X DELETE localhost:$C/api/connections/1       # closes 1 on whichever node has it
  curl -s localhost:$A/heartbeat; curl -s localhost:$A/metrics | grep -E 'backend_up|cluster_nodes'

Stop Redis (kill the redis-server) to see the nodes degrade and recover.
Ctrl-C stops everything.
EOF
wait
