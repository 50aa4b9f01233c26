#!/usr/bin/env bash
# Checks the running demo gateway against its own /openapi.json with schemathesis.
#
#   ci/schemathesis.sh                  # builds the (debug) binary, installs schemathesis in a venv
#   BC_BIN=path/to/business-connector SCHEMATHESIS=path/to/schemathesis ci/schemathesis.sh
#
# The demo is started on a free port (--listen 127.0.0.1:0; the port is read from its
# "serving" log line), /healthz is polled with a bounded deadline, schemathesis runs,
# and the gateway is stopped by its own PID whatever happened.
#
# Checks: all except negative_data_rejection. The Business Connector 1.4 contract
# answers an invalid request with HTTP 200 and code 1002 (1.4 clients read the code,
# not the status), so "invalid data must get a 4xx" does not hold by design.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${MAX_EXAMPLES:-30}"
BC_BIN="${BC_BIN:-}"
if [[ -z "$BC_BIN" ]]; then
    # The debug build: `cargo test --workspace` has built it already, and the demo's
    # answers do not depend on optimisation.
    cargo build --bin business-connector
    BC_BIN="${CARGO_TARGET_DIR:-target}/debug/business-connector"
fi
SCHEMATHESIS="${SCHEMATHESIS:-}"
if [[ -z "$SCHEMATHESIS" ]]; then
    if command -v schemathesis >/dev/null; then
        SCHEMATHESIS="$(command -v schemathesis)"
    else
        venv="${TMPDIR:-/tmp}/bc-schemathesis-venv"
        [[ -x "$venv/bin/schemathesis" ]] || {
            python3 -m venv "$venv"
            "$venv/bin/pip" install --quiet 'schemathesis>=4,<5'
        }
        SCHEMATHESIS="$venv/bin/schemathesis"
    fi
fi

log="$(mktemp)"
"$BC_BIN" --listen 127.0.0.1:0 >"$log" 2>&1 &
gateway=$!
trap 'kill "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; rm -f "$log"' EXIT

port=""
for _ in $(seq 1 300); do          # up to 30 s
    port="$(sed -n 's/.*listen=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n1)"
    if [[ -n "$port" ]] && curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$gateway" 2>/dev/null || { cat "$log"; echo "the gateway exited" >&2; exit 1; }
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || { cat "$log"; echo "no /healthz" >&2; exit 1; }
echo "gateway on port $port"

# From a scratch directory: schemathesis keeps a cache (.schemathesis/) in its working
# directory, which does not belong in the tree.
scratch="$(mktemp -d)"
trap 'kill "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; rm -rf "$log" "$scratch"' EXIT
cd "$scratch"
"$SCHEMATHESIS" run "http://127.0.0.1:$port/openapi.json" \
    --checks all --exclude-checks negative_data_rejection \
    --max-examples "$MAX_EXAMPLES" \
    --suppress-health-check all
