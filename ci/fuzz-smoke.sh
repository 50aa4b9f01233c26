#!/usr/bin/env bash
# A short smoke of every cargo-fuzz target: each replays its seed corpus and the saved
# regression inputs of earlier findings, then fuzzes for a few thousand executions.
# The long runs and their numbers are in RELIABILITY.md; this only keeps the targets
# building and every earlier finding fixed.
#
#   ci/fuzz-smoke.sh            # RUNS=20000 by default
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

RUNS="${RUNS:-20000}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || {
    # A skip is said plainly; under CI a missing tool is a failure, not a pass.
    echo "fuzz smoke: cargo-fuzz could not be installed; SKIPPED"
    [ "${CI:-}" = "true" ] && exit 1
    exit 0
  }
fi
# Only stable Rust is installed; cargo-fuzz needs nightly flags.
export RUSTC_BOOTSTRAP=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo fuzz list); do
  inputs=("corpus/$target")
  [ -d "regressions/$target" ] && inputs+=("regressions/$target")
  # New inputs go to a scratch corpus, so the repository's seeds stay as they are.
  mkdir -p "$work/$target"
  cargo fuzz run --sanitizer none --debug-assertions "$target" "$work/$target" "${inputs[@]}" -- \
    -runs="$RUNS" -max_len=8192 -timeout=10 >"$work/$target.log" 2>&1 || {
    echo "fuzz smoke: $target FAILED"
    tail -40 "$work/$target.log"
    exit 1
  }
  echo "fuzz smoke: $target ok ($(find "${inputs[@]}" -type f | wc -l) saved inputs replayed, $RUNS runs)"
done
