#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): known advisories from the offline RustSec
# snapshot in the shared folder, licenses, banned and duplicated crates, and sources.
#
# cargo-deny reads an advisory database as a git checkout in a folder named after its URL; the
# snapshot is plain files, so it is laid out as one, committed with the snapshot's own date so
# that the staleness check (deny.toml) sees its true age.
set -euo pipefail
cd "$(dirname "$0")/.."

snapshot=${LIVECREDITS_ADVISORY_DB:-../shared/advisory-db}
[[ -f $snapshot/SNAPSHOT ]] || { echo "supply-chain: no RustSec snapshot at $snapshot" >&2; exit 1; }
# cargo-deny's folder for https://github.com/rustsec/advisory-db: the URL's last segment and hash.
db=target/advisory-dbs/advisory-db-3157b0e258782691
taken=$(grep -o '20[0-9][0-9]-[0-9][0-9]-[0-9][0-9]' "$snapshot/SNAPSHOT" | head -n1)
[[ -n $taken ]] || { echo "supply-chain: no date in $snapshot/SNAPSHOT" >&2; exit 1; }

if ! cmp -s "$snapshot/SNAPSHOT" "$db/SNAPSHOT" || [[ ! -d $db/.git ]]; then
  rm -rf "$db"
  mkdir -p "$db"
  cp -R "$snapshot/." "$db/"
  chmod -R u+w "$db"
  git -C "$db" init -q
  git -C "$db" add -A
  GIT_AUTHOR_DATE="${taken}T00:00:00Z" GIT_COMMITTER_DATE="${taken}T00:00:00Z" \
    git -C "$db" -c user.name=livecredits -c user.email=supply-chain@livecredits.invalid \
    commit -q -m "RustSec advisory database snapshot of $taken"
fi

# cargo-deny reads the metadata of every platform's dependencies, and --offline keeps it to
# what is on disk; a fresh machine has downloaded only the ones its builds needed so far.
cargo fetch --locked --quiet
# Duplicates are listed (warnings) without the graph of who pulls each one in.
cargo deny --offline --locked check --hide-inclusion-graph
