#!/usr/bin/env bash
# Makes sure the test suite's outside services are there: Debian's Chromium with a CJK font,
# and PostgreSQL and Redis on their standard local ports (installed and started when absent).
set -euo pipefail

step() { printf '==> %s\n' "$*"; }
fail() { printf 'services: %s\n' "$*" >&2; exit 1; }

apt_install() {
  [[ $EUID -eq 0 ]] || fail "missing $*: install it with 'sudo apt-get install -y $*' and run again"
  step "installing $* (Debian packages)"
  if [[ -z "${APT_UPDATED:-}" ]]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Polls `check` for up to 30 s.
wait_for() {
  local what=$1
  shift
  for _ in $(seq 60); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "$what did not come up"
}

[[ -x /usr/bin/chromium ]] || apt_install chromium
# A CJK font, so the debug page's "积分明细" renders in the screenshots instead of boxes
# (WenQuanYi Micro Hei: 5 MB, against 90 MB for Noto CJK).
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || apt_install fonts-wqy-microhei

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ! compgen -G "/etc/postgresql/*/main" >/dev/null; then
    apt_install postgresql
    # A fresh cluster asks for passwords over TCP; the tests connect as postgres without one.
    hba=$(ls -d /etc/postgresql/*/main)/pg_hba.conf
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  step "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  command -v redis-server >/dev/null || apt_install redis-server
  step "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping
fi
