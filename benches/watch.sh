#!/usr/bin/env bash
# Occupancy watch: does watching 10,000 phones slow a login storm, and what does it cost
# in memory? Side by side in one run (see BENCHMARKS.md, "Occupancy watch").
#
#   benches/watch.sh
#
# One simulator (`cucm-sim --devices 10000 --users 10000 --max-concurrent 5
# --latency-ms 100`, queries 100 ms too) and two gateways with the storm settings of
# load.sh (deadline 60 s, max_concurrent 5, no rate limit, cache 60 s): "off" with
# `[watch] enabled = false`, "on" watching all 10,000 devices (a devices_file, the
# `[watch]` credentials, interval 60 s). The "on" gateway is given time to finish its
# first sweep (200 batches of 50), then runs alternate off/on: 1,000 logins at once
# (devices 1-1,000), then 1,000 logouts. Then memory: each gateway's VmRSS idle, and
# "on" with 100 /api/events subscribers connected through a storm.
#
# Knobs: RUNS=3 GEN_CPU=0 SUT_CPU=1 PORT_BASE=18180; binaries from
# ${CARGO_TARGET_DIR:-target}/release (cargo build --release -p business-connector
# -p sim -p bc-benches). Raw results: target/bench-results/watch-<timestamp>/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/target/bench-results/watch-$(date +%Y%m%d-%H%M%S)
RUNS=${RUNS:-3}
GEN_CPU=${GEN_CPU:-0}
SUT_CPU=${SUT_CPU:-1}
PORT_BASE=${PORT_BASE:-18180}
WATCHED=10000
STORM=1000
P_SIM=$PORT_BASE
P_OFF=$((PORT_BASE + 1))
P_ON=$((PORT_BASE + 2))
mkdir -p "$OUT"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/harness.log" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$OUT/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

wait_port() {
    local i
    for i in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$1"
}

metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s {print $2}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

for bin in business-connector cucm-sim bc-storm; do
    [ -x "$BIN/$bin" ] || die "$BIN/$bin missing: cargo build --release -p business-connector -p sim -p bc-benches"
done
ulimit -n 20000 2>/dev/null || true
{
    echo "date: $(date -Is)"
    echo "nproc: $(nproc)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt" >&2

start sim "$SUT_CPU" "$BIN/cucm-sim" --listen "127.0.0.1:$P_SIM" --devices "$WATCHED" --users "$WATCHED" --max-concurrent 5 --latency-ms 100
SIM_PID=$STARTED_PID
wait_port "$P_SIM"
SIM_STATS=""
for _ in $(seq 1 100); do
    SIM_STATS=$(sed -n 's/^control: //p' "$OUT/sim.log" | head -n1)
    [ -n "$SIM_STATS" ] && break
    sleep 0.1
done
[ -n "$SIM_STATS" ] || die "no control address from cucm-sim"

for i in $(seq 1 "$WATCHED"); do printf 'SEP%012X\n' "$i"; done >"$OUT/desks.txt"
printf 'bcsecret\n' >"$OUT/watch.secret"
config() {
    local port=$1 watch=$2
    cat <<TOML
listen = "127.0.0.1:$port"
deadline_ms = 60000
[history]
enabled = false
[watch]
$watch
[[cluster]]
code = "SIM"
nodes = ["http://127.0.0.1:$P_SIM/emservice/EMServiceServlet"]
max_concurrent = 5
max_requests_per_second = 0
cache_ttl_ms = 60000
TOML
}
config "$P_OFF" 'enabled = false' >"$OUT/off.toml"
config "$P_ON" "interval_ms = 60000
devices_file = \"$OUT/desks.txt\"
app_id = \"bcapp\"
app_certificate_file = \"$OUT/watch.secret\"" >"$OUT/on.toml"

start gw-off "$SUT_CPU" "$BIN/business-connector" --config "$OUT/off.toml"
OFF_PID=$STARTED_PID
start gw-on "$SUT_CPU" "$BIN/business-connector" --config "$OUT/on.toml"
ON_PID=$STARTED_PID
wait_port "$P_OFF"
wait_port "$P_ON"

log "waiting for the 'on' gateway's first sweep over $WATCHED devices"
for _ in $(seq 1 1200); do
    polls=$(metric "$P_ON" 'bc_watch_polls_total{cluster="SIM",outcome="ok"}')
    [ "${polls:-0}" -ge $((WATCHED / 50)) ] && break
    sleep 0.1
done
log "watched: $(metric "$P_ON" 'bc_watched_devices{cluster="SIM"}'), polls ok: $(metric "$P_ON" 'bc_watch_polls_total{cluster="SIM",outcome="ok"}')"
echo "off_idle_rss_kib $(rss_kib "$OFF_PID")" | tee -a "$OUT/memory.txt" >&2
echo "on_idle_rss_kib_10000_watched $(rss_kib "$ON_PID")" | tee -a "$OUT/memory.txt" >&2

storm() {
    local mode=$1 port=$2 run=$3
    for kind in login logout; do
        local flag=""
        [ "$kind" = logout ] && flag="--logout"
        local before_polls
        before_polls=$(metric "$P_ON" 'bc_watch_polls_total{cluster="SIM",outcome="ok"}')
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$port" login $flag \
            --devices "$STORM" --sim-stats "$SIM_STATS" |
            jq -c --arg mode "$mode" --arg kind "$kind" --argjson run "$run" \
                --arg load "$(cut -d' ' -f1 /proc/loadavg)" \
                --argjson polls_before "${before_polls:-0}" \
                '. + {mode: $mode, kind: $kind, run: $run, loadavg: $load, polls_before: $polls_before}' |
            tee -a "$OUT/storm.jsonl" >&2
    done
}

for run in $(seq 1 "$RUNS"); do
    log "run $run/$RUNS: off"
    storm off "$P_OFF" "$run"
    log "run $run/$RUNS: on"
    storm on "$P_ON" "$run"
done

# After the same storms: the connections' buffers are in both.
echo "off_rss_kib_after_storms $(rss_kib "$OFF_PID")" | tee -a "$OUT/memory.txt" >&2
echo "on_rss_kib_after_storms $(rss_kib "$ON_PID")" | tee -a "$OUT/memory.txt" >&2
polls_a=$(metric "$P_ON" 'bc_watch_polls_total{cluster="SIM",outcome="ok"}')
# A whole interval: polls come in sweeps (back to back while devices are due), so a
# shorter window would catch a sweep or a pause, not the rate.
sleep 60
polls_b=$(metric "$P_ON" 'bc_watch_polls_total{cluster="SIM",outcome="ok"}')
echo "idle_polls_per_minute $((polls_b - polls_a))" | tee -a "$OUT/memory.txt" >&2
log "memory: 100 subscribers on /api/events of the 'on' gateway through one more storm"
SUBS=()
for i in $(seq 1 100); do
    curl -sN "http://127.0.0.1:$P_ON/api/events" >"$OUT/subscriber-$i.txt" 2>/dev/null &
    SUBS+=("$!")
    PIDS+=("$!")
done
for _ in $(seq 1 100); do
    [ "$(metric "$P_ON" bc_event_subscribers)" = 100 ] && break
    sleep 0.1
done
echo "on_subscribers $(metric "$P_ON" bc_event_subscribers)" | tee -a "$OUT/memory.txt" >&2
echo "on_rss_kib_100_subscribers_connected $(rss_kib "$ON_PID")" | tee -a "$OUT/memory.txt" >&2
storm on-100-subscribers "$P_ON" 0
echo "on_rss_kib_10000_watched_100_subscribers_after_storm $(rss_kib "$ON_PID")" | tee -a "$OUT/memory.txt" >&2
echo "events_per_subscriber $(grep -c '^event: change' "$OUT/subscriber-1.txt")" | tee -a "$OUT/memory.txt" >&2
echo "subscribers_dropped $(metric "$P_ON" bc_event_subscribers_dropped_total)" | tee -a "$OUT/memory.txt" >&2
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2

median() { jq -s --arg m "$1" --arg k "$2" '[.[] | select(.mode == $m and .kind == $k) | .elapsed_s] | sort | .[(length / 2 | floor)]' "$OUT/storm.jsonl"; }
{
    echo "| storm | off (median of $RUNS) | on, $WATCHED watched (median of $RUNS) | on / off |"
    echo "|---|---:|---:|---:|"
    for kind in login logout; do
        off=$(median off "$kind")
        on=$(median on "$kind")
        echo "| $kind | $off s | $on s | $(echo "scale=3; $on / $off" | bc) |"
    done
} | tee "$OUT/tables.txt"
log "raw results: $OUT"
