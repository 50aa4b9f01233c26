#!/usr/bin/env bash
# A/B of two gateway binaries, interleaved, on the harness's placement: wrk on one core,
# the gateway and cucm-sim on the other. Peak req/s of getloggedinuser, pass-through
# (cache off) and cache hits. See BENCHMARKS.md ("After the first run").
#
#   benches/ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
#
# Build the two binaries from the commits to compare (cargo build --release -p
# business-connector, then copy target/release/business-connector aside).
set -euo pipefail

BEFORE=${1:?usage: $0 BEFORE_BINARY AFTER_BINARY [ROUNDS]}
AFTER=${2:?usage: $0 BEFORE_BINARY AFTER_BINARY [ROUNDS]}
ROUNDS=${3:-3}
GEN_CPU=${GEN_CPU:-0}
SUT_CPU=${SUT_CPU:-1}
PORT_BASE=${PORT_BASE:-19080}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/bench-results/ab-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
(cd "$ROOT" && cargo build --release -q -p sim --bin cucm-sim)
SIM=${CARGO_TARGET_DIR:-$ROOT/target}/release/cucm-sim

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    return 1
}
write_config() { # port cache_ttl_ms
    cat >"$OUT/gateway-$1.toml" <<TOML
listen = "127.0.0.1:$1"
workers = 1
[[cluster]]
code = "SIM"
nodes = ["http://127.0.0.1:$PORT_BASE/emservice/EMServiceServlet"]
max_concurrent = 100
max_requests_per_second = 0
cache_ttl_ms = $2
queue_limit = 100000
TOML
}
PASS=$((PORT_BASE + 2))
CACHE=$((PORT_BASE + 3))
write_config $PASS 0
write_config $CACHE 3600000

taskset -c "$SUT_CPU" "$SIM" --listen "127.0.0.1:$PORT_BASE" --devices 1000 --users 1000 >"$OUT/sim.log" 2>&1 &
wait_port "$PORT_BASE"

measure() { # label binary port
    taskset -c "$SUT_CPU" "$2" --config "$OUT/gateway-$3.toml" >"$OUT/$1-$3.log" 2>&1 &
    local pid=$!
    wait_port "$3"
    local wrk_args=(-t1 -c32 -s "$ROOT/benches/bc.lua" "http://127.0.0.1:$3")
    # The warm-up also fills the cache of the cache-hit gateway.
    BC_MODE=northbound BC_DEVICES=1000 taskset -c "$GEN_CPU" wrk -d3s "${wrk_args[@]}" >/dev/null
    local rps
    rps=$(BC_MODE=northbound BC_DEVICES=1000 taskset -c "$GEN_CPU" wrk -d10s "${wrk_args[@]}" |
        awk '/Requests\/sec/ {print $2}')
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    echo "$1 $([ "$3" = "$PASS" ] && echo pass-through || echo cache-hit) $rps" | tee -a "$OUT/ab.txt"
}
for round in $(seq 1 "$ROUNDS"); do
    for side in before after; do
        binary=$BEFORE
        [ "$side" = after ] && binary=$AFTER
        measure "$side" "$binary" "$PASS"
        measure "$side" "$binary" "$CACHE"
    done
done
echo "raw: $OUT/ab.txt"
