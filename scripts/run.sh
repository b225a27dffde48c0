#!/usr/bin/env bash
# `make run`: builds livecredits and serves it on the embedded defaults at http://127.0.0.1:3000
# (SQLite under data/, in-process bus, dev sign-in on, a generated dev secret).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/setup.sh
export LIVECREDITS_DEV_LOGIN="${LIVECREDITS_DEV_LOGIN:-1}"
mkdir -p data
exec cargo leptos serve --release
