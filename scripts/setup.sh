#!/usr/bin/env bash
# Installs the build tools livecredits needs, at the versions verified together
# (docs/TOOLCHAIN.md), skipping whatever is already in place. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly CARGO_LEPTOS_VERSION=0.3.10
readonly CARGO_DENY_VERSION=0.20.2
# Installing tools needs no fat LTO; this halves cargo-leptos's build time here.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback

step() { printf '==> %s\n' "$*"; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || fail "cargo not found: install Rust with rustup (https://rustup.rs)"
command -v npm >/dev/null || fail "npm not found: install Node.js 20 or newer"

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  step "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown
fi

if [[ "$(cargo leptos --version 2>/dev/null)" != *" $CARGO_LEPTOS_VERSION" ]]; then
  step "installing cargo-leptos $CARGO_LEPTOS_VERSION (about 10 minutes, once)"
  cargo install cargo-leptos --locked --version "$CARGO_LEPTOS_VERSION"
fi

if [[ "$(cargo deny --version 2>/dev/null)" != *" $CARGO_DENY_VERSION" ]]; then
  step "installing cargo-deny $CARGO_DENY_VERSION for the supply-chain checks (about 8 minutes, once)"
  cargo install cargo-deny --locked --version "$CARGO_DENY_VERSION"
fi

# cargo-leptos downloads wasm-bindgen from GitHub unless one is on PATH, and the CLI must
# match the crate in Cargo.lock exactly.
bindgen_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
[[ -n "$bindgen_version" ]] || fail "no wasm-bindgen in Cargo.lock"
if [[ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $bindgen_version" ]]; then
  step "installing wasm-bindgen-cli $bindgen_version"
  # Not --locked: its own lockfile pins a crate version the registry mirror lacks.
  cargo install wasm-bindgen-cli --version "$bindgen_version"
fi

# npm packages: Playwright and binaryen's wasm-opt (Debian's older wasm-opt breaks hydration).
if [[ ! -x end2end/node_modules/.bin/wasm-opt || end2end/package-lock.json -nt end2end/node_modules ]]; then
  step "installing npm packages in end2end/"
  (cd end2end && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
  touch end2end/node_modules
fi
