#!/usr/bin/env bash
# `make test`: sets everything up, then runs lints, every Rust test and the Playwright suite
# against a release build. Keeps going after a failure so one run shows everything, exits
# non-zero if anything failed, and ends with the line "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/setup.sh || exit 1
scripts/services.sh || exit 1

logs=target/test-logs
mkdir -p "$logs"
passed=0
failed=0

step() { printf '\n==> %s\n' "$*"; }
# A check that is not a test runner counts as one test.
check() {
  local name=$1
  shift
  step "$name"
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $name"; fi
}

check "cargo fmt --check" cargo fmt --all -- --check
check "cargo deny (advisories, licenses, bans, sources)" scripts/supply-chain.sh
# The server and browser builds are checked apart, each with its real features: in one
# --workspace build cargo would unify app's `ssr` and `hydrate` into a mix neither ships.
check "cargo clippy (server)" cargo clippy --workspace --exclude frontend --all-targets --locked -- -D warnings
check "cargo clippy (browser)" cargo clippy -p frontend --target wasm32-unknown-unknown --locked -- -D warnings

step "cargo test"
cargo test --workspace --exclude frontend --locked --no-fail-fast 2>&1 | tee "$logs/cargo-test.log"
rust_status=${PIPESTATUS[0]}
read -r rust_passed rust_failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$logs/cargo-test.log")
passed=$((passed + rust_passed))
failed=$((failed + rust_failed))
if [[ $rust_status -ne 0 && $rust_failed -eq 0 ]]; then failed=$((failed + 1)); fi

step "cargo leptos build --release"
if cargo leptos build --release; then
  step "playwright"
  rm -f end2end/test-results/results.json
  (cd end2end && npx playwright test)
  e2e_status=$?
  results=end2end/test-results/results.json
  if [[ -f $results ]]; then
    read -r e2e_passed e2e_failed < <(node -e '
      const s = require(process.argv[1]).stats;
      console.log(s.expected + s.flaky, s.unexpected);' "$PWD/$results")
  else
    e2e_passed=0 e2e_failed=0
  fi
  passed=$((passed + e2e_passed))
  failed=$((failed + e2e_failed))
  if [[ $e2e_status -ne 0 && $e2e_failed -eq 0 ]]; then failed=$((failed + 1)); fi
else
  failed=$((failed + 1))
  echo "FAILED: release build"
fi

echo
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
