#!/usr/bin/env bash
# Runs every fuzz target, one after the other (the machine's 2 cores are shared), for
# RUNS executions each or MAX_TIME seconds, whichever comes first, and keeps each
# target's libFuzzer output in $LOG_DIR/<target>.log.
#   fuzz/run-all.sh                        # all targets
#   RUNS=1000000 fuzz/run-all.sh em_response
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
MAX_TIME=${MAX_TIME:-900}
LOG_DIR=${LOG_DIR:-${CARGO_TARGET_DIR:-target}/fuzz-logs}
mkdir -p "$LOG_DIR"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(northbound_message northbound_path northbound_form em_response xml_parser)
for target in "${targets[@]}"; do
  echo "== $target"
  # --sanitizer none: the code under test is safe Rust, so ASan would only slow the
  # search; --debug-assertions turns integer overflow into a finding.
  RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --debug-assertions "$target" -- \
    -runs="$RUNS" -max_total_time="$MAX_TIME" -max_len=8192 -timeout=10 \
    -print_final_stats=1 >"$LOG_DIR/$target.log" 2>&1 || echo "$target: exit $? (see $LOG_DIR/$target.log)"
  grep -E '^#[0-9]+ +DONE|^Done|stat::|^==[0-9]+== ERROR|panicked' "$LOG_DIR/$target.log" || true
done
