#!/usr/bin/env bash
# Two Business Connector instances behind HAProxy, on loopback only.
#
#   deploy/test-loopback.sh                    # release binaries (built if stale)
#   BC_PROFILE=debug deploy/test-loopback.sh   # the debug ones `cargo test` just built
#
# Needs: python3 (standard library only), Debian's `haproxy` (2.6+), cargo. The
# binaries `business-connector` and `cucm-sim` are brought up to date with cargo in
# $CARGO_TARGET_DIR (default target/) unless BC_BIN and SIM_BIN name them; HAPROXY
# overrides haproxy's path; KEEP_LOGS=1 keeps the processes' logs. Prints a PASS/FAIL
# line per check and "loopback: N passed, M failed"; exits non-zero on any failure.
# Every process it starts is ended on exit. What is checked: deploy/loopback_test.py;
# the set-up: deploy/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PROFILE=${BC_PROFILE:-release}
case "$PROFILE" in
release) CARGO_PROFILE=(--release) ;;
debug) CARGO_PROFILE=() ;;
*)
    echo "BC_PROFILE must be release or debug" >&2
    exit 2
    ;;
esac

if ! command -v "${HAPROXY:-haproxy}" >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    echo "haproxy is not installed (Debian: apt-get install -y haproxy)" >&2
    exit 2
fi
# cargo is a no-op when the binaries are up to date; never test a stale build.
if [ -z "${BC_BIN:-}" ]; then
    (cd "$ROOT" && cargo build "${CARGO_PROFILE[@]}" -p business-connector --bin business-connector)
    export BC_BIN=$TARGET/$PROFILE/business-connector
fi
if [ -z "${SIM_BIN:-}" ]; then
    (cd "$ROOT" && cargo build "${CARGO_PROFILE[@]}" -p sim --bin cucm-sim)
    export SIM_BIN=$TARGET/$PROFILE/cucm-sim
fi
if [ -z "${HAPROXY:-}" ]; then
    HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
    export HAPROXY
fi

# exec: the Python process gets the signals directly and ends its children itself.
exec python3 "$ROOT/deploy/loopback_test.py"
