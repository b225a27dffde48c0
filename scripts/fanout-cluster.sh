#!/usr/bin/env bash
# The cluster fan-out benchmark of docs/SCALING.md: four instances on PostgreSQL and a
# three-master Redis Cluster of their own, 10,000 WebSockets (2,000 users × 5, each user's on
# one instance), 1,000 changes/s for 60 s, each applied through an instance other than its
# user's so that every one crosses the bus. Prints the fan-out result and how many bus
# messages each instance received.
#
#   scripts/fanout-cluster.sh [seconds] [redis-url]   (default 60 s on the script's own cluster;
#                                                      needs `cargo build --release -p server --bins`)
set -euo pipefail
cd "$(dirname "$0")/.."

readonly SECONDS_=${1:-60}
readonly DB=lc_fanout FIRST_PORT=7300 PORTS=(3921 3922 3923 3924)
readonly LOG=target/fanout-cluster
readonly CLUSTER_URL="redis-cluster://127.0.0.1:$FIRST_PORT?node=127.0.0.1:$((FIRST_PORT + 1))&node=127.0.0.1:$((FIRST_PORT + 2))"
readonly BUS_URL=${2:-$CLUSTER_URL}
readonly SECRET=$(openssl rand -hex 32) SERVICE=$(openssl rand -hex 32)
# The four instances share this machine's cores, so each gets one runtime worker per core of
# its share (at least one), as a deployment packing instances onto one machine would set
# them; alone on a machine an instance keeps tokio's default of one worker per core.
readonly SERVER_THREADS=$(( $(nproc) / ${#PORTS[@]} > 1 ? $(nproc) / ${#PORTS[@]} : 1 ))
mkdir -p "$LOG"

psql_admin() { psql -h 127.0.0.1 -U postgres -d postgres -qAtc "$1" >/dev/null; }

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  scripts/redis-cluster.sh stop "$PWD/$LOG/cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

scripts/services.sh
psql_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_admin "CREATE DATABASE $DB"
[[ $BUS_URL == "$CLUSTER_URL" ]] && scripts/redis-cluster.sh start "$PWD/$LOG/cluster" $FIRST_PORT

for port in "${PORTS[@]}"; do
  TOKIO_WORKER_THREADS=$SERVER_THREADS LEPTOS_SITE_ADDR=127.0.0.1:$port LEPTOS_SITE_ROOT=target/site \
    DATABASE_URL=postgres://postgres@127.0.0.1/$DB REDIS_URL=$BUS_URL REDIS_CHANNEL_PREFIX=fanout \
    JWT_SECRET=$SECRET SUPABASE_SERVICE_ROLE_KEY=$SERVICE RUST_LOG=warn \
    target/release/server >"$LOG/server-$port.log" 2>&1 &
  pids+=($!)
done
for i in "${!PORTS[@]}"; do
  until curl -sf "http://127.0.0.1:${PORTS[$i]}/readyz" >/dev/null; do
    kill -0 "${pids[$i]}" 2>/dev/null || { cat "$LOG/server-${PORTS[$i]}.log"; exit 1; }
    sleep 0.2
  done
done

urls=$(printf 'http://127.0.0.1:%s,' "${PORTS[@]}")
target/release/credits --url "http://127.0.0.1:${PORTS[0]}" bench fanout --instance "${urls%,}" \
  --secret "$SECRET" --service-token "$SERVICE" --users 2000 --per-user 5 --rate 1000 \
  --duration "${SECONDS_}s" --sources 127.0.0.1,127.0.0.2 | tee "$LOG/fanout.txt"
for port in "${PORTS[@]}"; do
  printf '%s: ' "$port"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^livecredits_bus_messages_(received|sent)_total' | tr '\n' ' '
  echo
done | tee -a "$LOG/fanout.txt"
