#!/usr/bin/env bash
# Batched queries, side by side (BENCHMARKS.md "Q3"): 1,000 phones asked cold at once
# (bc-storm query: 1,000 connections, one getloggedinuser each, every device once)
# against cucm-sim --max-concurrent 5 --latency-ms 100, gateway max_concurrent = 5 and
# max_requests_per_second = 20, with max_devices_per_query = 50 (batching on) and = 1
# (off). RUNS runs each, interleaved; one JSON line per run on stdout. Batching on runs
# with the default deadline_ms (15 s); off needs 60 s, or the gateway would rightly shed
# the tail with 1004 (1,000 calls at 20/s take 50 s).
#
#   benches/batching.sh            # CARGO_TARGET_DIR picks where the release binaries are
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
RUNS=${RUNS:-3}
cargo build --release -q --bin business-connector --bin cucm-sim --bin bc-storm \
    --manifest-path "$ROOT/Cargo.toml" --workspace
ulimit -n 20000 2>/dev/null || true

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

sim_port=$(free_port)
"$BIN/cucm-sim" --listen "127.0.0.1:$sim_port" --devices 1000 --users 1000 \
    --max-concurrent 5 --latency-ms 100 >"$work/sim.log" 2>&1 &
pids+=($!)
stats=
for _ in $(seq 1 100); do
    stats=$(sed -n 's/^control: //p' "$work/sim.log" | head -n1)
    [ -n "$stats" ] && break
    sleep 0.1
done
[ -n "$stats" ] || { cat "$work/sim.log"; exit 1; }

run() { # run MAX_DEVICES_PER_QUERY DEADLINE_MS RUN
    local per_query=$1 deadline=$2 n=$3 port pid
    port=$(free_port)
    cat >"$work/gw.toml" <<TOML
listen = "127.0.0.1:$port"
deadline_ms = $deadline
log_format = "json"

[access]
max_connections_per_client = 0   # bc-storm: 1,000 connections from one address

[[cluster]]
code = "SIM"
nodes = ["http://127.0.0.1:$sim_port/emservice/EMServiceServlet"]
max_concurrent = 5
max_requests_per_second = 20
cache_ttl_ms = 60000
max_devices_per_query = $per_query
TOML
    RUST_LOG=warn "$BIN/business-connector" --config "$work/gw.toml" >"$work/gw.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$BIN/bc-storm" --gateway "127.0.0.1:$port" query --devices 1000 --requests 1000 \
        --connections 1000 --sim-stats "$stats" |
        jq -c --argjson per_query "$per_query" --argjson deadline "$deadline" --argjson run "$n" \
            '. + {max_devices_per_query: $per_query, deadline_ms: $deadline, run: $run}'
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

for n in $(seq 1 "$RUNS"); do
    run 50 15000 "$n"
    run 1 60000 "$n"
done
