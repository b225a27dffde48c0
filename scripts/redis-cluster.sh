#!/usr/bin/env bash
# A real Redis Cluster on loopback for the tests: sharded pub/sub, slot routing, MOVED
# redirects and failover only show up against a cluster, never against one Redis.
#
#   scripts/redis-cluster.sh start <dir> <first-port> [replicas]   (replicas: 0 or 1, default 0)
#   scripts/redis-cluster.sh stop <dir>
#
# `start` runs 3 masters on first-port..first-port+2 and, with replicas=1, one replica each on
# first-port+3..first-port+5; everything (config, logs, pid files) lives in <dir>. `stop`
# shuts down every node started from <dir> and does nothing when none is running.
set -euo pipefail

# A node's cluster bus listens on its port + 10000; the highest node port is first-port + 5.
readonly MAX_FIRST_PORT=55530
readonly WAIT_SECONDS=30

step() { printf '==> %s\n' "$*"; }
fail() { printf 'redis-cluster: %s\n' "$*" >&2; exit 1; }
usage() { fail "usage: $0 start <dir> <first-port> [replicas] | stop <dir>"; }

# Whether something accepts connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Whether pid $1 is a live redis-server (not a recycled pid of something else).
is_redis() { [[ "$(ps -o comm= -p "$1" 2>/dev/null)" == redis-server* ]]; }

# Polls `check` once per 0.2 s for up to WAIT_SECONDS; fails with `what` on timeout.
wait_until() {
  local what=$1
  shift
  for _ in $(seq $((WAIT_SECONDS * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  fail "$what within ${WAIT_SECONDS} s"
}

node_answers() { redis-cli -p "$1" ping | grep -q PONG; }
# Whether node $1 sees the cluster as ok with all $2 replicas attached: right after
# `--cluster create` the state is ok before the gossip has told every node who replicates whom.
cluster_ready() {
  redis-cli -p "$1" cluster info | grep -q '^cluster_state:ok' &&
    [[ $(redis-cli -p "$1" cluster nodes | awk '$3 ~ /slave/' | wc -l) -eq $2 ]]
}
# Whether replica $1 has finished its first sync, so a failover can promote it at once.
replica_synced() { redis-cli -p "$1" info replication | grep -q '^master_link_status:up'; }

start_node() {
  local dir=$1 port=$2
  redis-server --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
    --dir "$dir" --port "$port" --bind 127.0.0.1 --daemonize yes \
    --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" \
    --save '' --appendonly no --cluster-node-timeout 2000
}

start() {
  [[ $# -ge 2 && $# -le 3 ]] || usage
  local dir=$1 first=$2 replicas=${3:-0}
  [[ $first =~ ^[0-9]+$ && $first -ge 1 ]] || fail "first-port must be a port number, not '$first'"
  ((first <= MAX_FIRST_PORT)) ||
    fail "first-port $first too high: node ports up to first-port+5 need bus ports +10000 <= 65535, so first-port <= $MAX_FIRST_PORT"
  [[ $replicas == 0 || $replicas == 1 ]] || fail "replicas must be 0 or 1, not '$replicas'"
  command -v redis-server >/dev/null || fail "redis-server not found: run scripts/services.sh"

  local count=$((3 * (1 + replicas))) ports=() port
  for ((port = first; port < first + count; port++)); do ports+=("$port"); done
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  for port in "${ports[@]}"; do
    [[ ! -f $dir/redis-$port.pid ]] || ! is_redis "$(<"$dir/redis-$port.pid")" ||
      fail "a node from $dir is still running on $port: run '$0 stop $dir' first"
    ! port_busy "$port" || fail "port $port is already in use"
    ! port_busy $((port + 10000)) || fail "cluster bus port $((port + 10000)) is already in use"
  done
  # A node that finds an old nodes-*.conf rejoins that old cluster instead of a new one.
  rm -f "$dir"/nodes-*.conf "$dir"/redis-*.pid

  step "starting ${#ports[@]} Redis nodes on ${ports[0]}..${ports[-1]} in $dir"
  # A start that fails half way leaves no node running.
  trap "stop $(printf %q "$dir") >/dev/null 2>&1" EXIT
  for port in "${ports[@]}"; do start_node "$dir" "$port"; done
  for port in "${ports[@]}"; do
    wait_until "node $port did not answer (see $dir/redis-$port.log)" node_answers "$port"
  done

  step "creating the cluster: 3 masters, $replicas replica per master"
  local addresses=("${ports[@]/#/127.0.0.1:}")
  redis-cli --cluster create "${addresses[@]}" --cluster-replicas "$replicas" --cluster-yes \
    >"$dir/create.log" 2>&1 || fail "redis-cli --cluster create failed (see $dir/create.log)"
  for port in "${ports[@]}"; do
    wait_until "node $port does not see the cluster ok with $((3 * replicas)) replicas" \
      cluster_ready "$port" $((3 * replicas))
  done
  for port in "${ports[@]:3}"; do
    wait_until "replica $port did not sync with its master" replica_synced "$port"
  done
  trap - EXIT
  step "cluster up: 127.0.0.1:$first (nodes ${ports[0]}..${ports[-1]})"
}

# Stops the node whose pid file is $1: TERM, then KILL if it lingers 5 s. A stale file (the
# node died, or a test killed it) is just removed. Fails when there was nothing to stop.
stop_node() {
  local file=$1 pid
  pid=$(<"$file")
  rm -f "$file"
  [[ $pid =~ ^[0-9]+$ ]] && is_redis "$pid" || return 1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    is_redis "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  [[ $# -eq 1 ]] || usage
  local dir=$1 file stopped=0
  [[ -d $dir ]] || { step "nothing to stop: no $dir"; return 0; }
  for file in "$dir"/redis-*.pid; do
    [[ -f $file ]] || continue
    if stop_node "$file"; then stopped=$((stopped + 1)); fi
  done
  step "stopped $stopped Redis nodes from $dir"
}

case ${1:-} in
  start) shift && start "$@" ;;
  stop) shift && stop "$@" ;;
  *) usage ;;
esac
