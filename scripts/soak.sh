#!/usr/bin/env bash
# The soak benchmark of docs/BENCHMARKS.md: two instances on PostgreSQL and a Redis of their
# own, 10,000 WebSocket connections with 5 %/s churn and 500 changes/s, while Redis is
# restarted twice and PostgreSQL cut off for 5 s twice. `credits bench soak` then checks that
# nothing was lost or left stale and that the servers gave back what the connections took.
# A 2-minute warm-up soak runs first, so that the baseline the servers must return to is a
# warm process (pools filled, the allocator at its working size), not a cold one.
#
#   scripts/soak.sh [minutes]        (default 32; needs `cargo build --release -p server --bins`)
set -euo pipefail
cd "$(dirname "$0")/.."

readonly MINUTES=${1:-32}
readonly DB=lc_soak REDIS_PORT=6399 PORTS=(3911 3912)
readonly LOG=target/soak
readonly SECRET=$(openssl rand -hex 32) SERVICE=$(openssl rand -hex 32)
mkdir -p "$LOG"

note() { printf '%(%H:%M:%S)T %s\n' -1 "$*" | tee -a "$LOG/faults.log"; }
psql_admin() { psql -h 127.0.0.1 -U postgres -d postgres -qAtc "$1" >/dev/null; }

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 || true
  psql_admin "ALTER DATABASE $DB ALLOW_CONNECTIONS true" 2>/dev/null || true
}
trap cleanup EXIT

start_redis() {
  redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no \
    --logfile "$PWD/$LOG/redis.log"
  until redis-cli -p $REDIS_PORT ping 2>/dev/null | grep -q PONG; do sleep 0.1; done
}

restart_redis() {
  note "Redis: shut down"
  redis-cli -p $REDIS_PORT shutdown nosave >/dev/null 2>&1 || true
  sleep 2
  start_redis
  note "Redis: back"
}

# Every open connection to the database is ended and new ones are refused for 5 s: to the
# instances this is PostgreSQL going away and coming back.
cut_postgres() {
  note "PostgreSQL: cut"
  psql_admin "ALTER DATABASE $DB ALLOW_CONNECTIONS false"
  psql_admin "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$DB'"
  sleep 5
  psql_admin "ALTER DATABASE $DB ALLOW_CONNECTIONS true"
  note "PostgreSQL: back"
}

scripts/services.sh
psql_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_admin "CREATE DATABASE $DB"
: >"$LOG/faults.log"
start_redis

for port in "${PORTS[@]}"; do
  LEPTOS_SITE_ADDR=127.0.0.1:$port LEPTOS_SITE_ROOT=target/site \
    DATABASE_URL=postgres://postgres@127.0.0.1/$DB REDIS_URL=redis://127.0.0.1:$REDIS_PORT \
    JWT_SECRET=$SECRET SUPABASE_SERVICE_ROLE_KEY=$SERVICE RUST_LOG=warn \
    target/release/server >"$LOG/server-$port.log" 2>&1 &
  pids+=($!)
done
for port in "${PORTS[@]}"; do
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
done

urls=$(printf 'http://127.0.0.1:%s,' "${PORTS[@]}")
soak() {
  target/release/credits --url "http://127.0.0.1:${PORTS[0]}" bench soak \
    --instance "${urls%,}" --server-pid "$(IFS=,; echo "${pids[*]}")" \
    --secret "$SECRET" --service-token "$SERVICE" "$@"
}
note "warm-up: 2 minutes"
soak --duration 2m --sources 127.0.0.5,127.0.0.6 --prefix warm | tee "$LOG/warm-up.txt"
note "soak: $MINUTES minutes"
soak --duration "${MINUTES}m" --sources 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 --prefix soak \
  | tee "$LOG/soak.txt" &
bench=$!

# Faults at 20 %, 35 %, 55 % and 70 % of the run, after the connections are open.
seconds=$((MINUTES * 60))
for fault in "20 restart_redis" "35 cut_postgres" "55 restart_redis" "70 cut_postgres"; do
  read -r percent action <<<"$fault"
  (sleep $((seconds * percent / 100 + 60)) && $action) &
done
wait $bench
