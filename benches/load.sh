#!/usr/bin/env bash
# Business Connector load harness: "does the gateway add latency?" and "what happens
# at 8:55 on Monday?", measured side by side in one run. See BENCHMARKS.md.
#
#   benches/load.sh [all|latency|storm|memory|history]     (default: all; history runs
#                                                          only when named)
#
# Stages:
#   latency  direct to cucm-sim / nginx proxy_pass / gateway pass-through / gateway
#            cache hits: peak (wrk) and fixed-rate open-loop latency (bc-load),
#            RUNS runs each, interleaved, medians reported.
#   storm    1,000 logins at once against --max-concurrent 5 --latency-ms 100, the
#            logouts back, and 100,000 getloggedinuser over 1,000 devices.
#   memory   gateway RSS with 100,000 devices cached and 10,000 client connections.
#   history  the request history's cost, off vs on (SQLite), interleaved, RUNS runs
#            each: cache-hit peak, pass-through peak (with the writer's CPU per
#            record), 1,000 logins and 1,000 logouts during a saturating cache-hit flood
#            (every change recorded?), open-loop latency at HISTORY_RATE req/s (default
#            5000). On a shared machine: run it when nothing else is busy (its tables
#            end with the load average seen).
#
# Knobs (environment): RUNS=3 DURATION=10 (s per peak/fixed-rate run) WARMUP=2
# CONNS=32 FIXED_RATE (req/s; default half the lower pass-through peak)
# GEN_CPU=0 SUT_CPU=1 (load generator vs everything under test) SIM_CPU (default:
# SUT_CPU, so a proxy and its backend share one core) PORT_BASE=18080
# CARGO_TARGET_DIR (where the release binaries are built).
#
# Raw results: target/bench-results/<timestamp>/ (not committed).
set -euo pipefail

STAGE=${1:-all}
case "$STAGE" in all | latency | storm | memory | history) ;; *)
    echo "usage: $0 [all|latency|storm|memory|history]" >&2
    exit 2
    ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-32}
GEN_CPU=${GEN_CPU:-0}
SUT_CPU=${SUT_CPU:-1}
SIM_CPU=${SIM_CPU:-$SUT_CPU}
PORT_BASE=${PORT_BASE:-18080}
DEVICES=1000

P_SIM=$PORT_BASE
P_NGINX=$((PORT_BASE + 1))
P_GW_PASS=$((PORT_BASE + 2))
P_GW_CACHE=$((PORT_BASE + 3))
P_STORM_SIM=$((PORT_BASE + 10))
P_STORM_GW=$((PORT_BASE + 11))
P_MEM_SIM=$((PORT_BASE + 20))
P_MEM_GW=$((PORT_BASE + 21))

mkdir -p "$OUT"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/harness.log" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------------- processes
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CPU CMD...: runs CMD pinned to CPU, output to $OUT/NAME.log; sets STARTED_PID.
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$OUT/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

stop() {
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$port after 10 s"
}

port_free() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        die "127.0.0.1:$1 is already in use (set PORT_BASE)"
    fi
}

# start_sim NAME PORT ARGS...: sets SIM_PID and SIM_STATS (the control stats URL).
start_sim() {
    local name=$1 port=$2 i
    shift 2
    port_free "$port"
    start "$name" "$SIM_CPU" "$BIN/cucm-sim" --listen "127.0.0.1:$port" "$@"
    SIM_PID=$STARTED_PID
    SIM_STATS=
    for i in $(seq 1 100); do
        SIM_STATS=$(sed -n 's/^control: //p' "$OUT/$name.log" | head -n1)
        [ -n "$SIM_STATS" ] && break
        sleep 0.1
    done
    [ -n "$SIM_STATS" ] || die "cucm-sim did not print its control address (see $OUT/$name.log)"
}

# gateway_config FILE PORT SIM_PORT KEY=VALUE... (cluster keys after "--")
gateway_config() {
    local file=$1 port=$2 sim_port=$3
    shift 3
    {
        echo "listen = \"127.0.0.1:$port\""
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do
            echo "$1"
            shift
        done
        [ $# -gt 0 ] && shift
        echo
        # The load generators are one address holding thousands of connections.
        echo "[access]"
        echo "max_connections_per_client = 0"
        echo
        echo "[[cluster]]"
        echo 'code = "SIM"'
        echo "nodes = [\"http://127.0.0.1:$sim_port/emservice/EMServiceServlet\"]"
        for line in "$@"; do echo "$line"; done
    } >"$file"
}

# start_gateway NAME CONFIG PORT: sets GW_PID.
start_gateway() {
    local name=$1 config=$2 port=$3
    port_free "$port"
    start "$name" "$SUT_CPU" "$BIN/business-connector" --config "$config"
    GW_PID=$STARTED_PID
    wait_port "$port"
}

# ---------------------------------------------------------------- setup
machine_info() {
    {
        echo "date: $(date -Is)"
        echo "nproc: $(nproc)"
        echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
        echo "kernel: $(uname -r)"
        echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
        echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "placement: load generator on CPU $GEN_CPU; nginx and gateway on CPU $SUT_CPU; simulator on CPU $SIM_CPU"
        echo "runs=$RUNS duration=${DURATION}s warmup=${WARMUP}s connections=$CONNS"
    } | tee "$OUT/machine.txt" >&2
}

# What else is using the machine (the box is shared): load average and top processes.
other_work() {
    {
        echo "--- $1: loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
        ps -eo pcpu,pid,comm --sort=-pcpu | head -n 6
    } >>"$OUT/other-work.txt"
    log "$1: loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
}

need_tools() {
    local missing=()
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v jq >/dev/null || missing+=(jq)
    if [ "$STAGE" = all ] || [ "$STAGE" = latency ] || [ "$STAGE" = history ]; then
        command -v wrk >/dev/null || missing+=(wrk)
        command -v nginx >/dev/null || missing+=(nginx)
        command -v curl >/dev/null || missing+=(curl)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing: ${missing[*]}"
        if ! { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; } >>"$OUT/apt.log" 2>&1; then
            die "missing ${missing[*]} and apt-get could not install them (see $OUT/apt.log)"
        fi
    fi
    [ "$(nproc)" -ge 2 ] || die "needs 2 CPUs: one for the load generator, one for the servers"
}

build() {
    log "building release binaries (business-connector, cucm-sim, bc-load, bc-storm)"
    (cd "$ROOT" && cargo build --release -q -p business-connector -p sim -p bc-benches --bins) ||
        die "cargo build failed"
}

# ---------------------------------------------------------------- stage: latency
write_wrk_script() {
    # Shared with benches/ab.sh.
    cp "$ROOT/benches/bc.lua" "$OUT/bc.lua"
}

write_nginx_config() {
    mkdir -p "$OUT/nginx"
    cat >"$OUT/nginx/nginx.conf" <<NGINX
# What a team would put in front of CUCM: one worker, keep-alive upstream.
worker_processes 1;
daemon off;
user root;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $OUT/nginx/access.log;
    client_body_temp_path $OUT/nginx/body;
    proxy_temp_path $OUT/nginx/proxy;
    fastcgi_temp_path $OUT/nginx/fastcgi;
    uwsgi_temp_path $OUT/nginx/uwsgi;
    scgi_temp_path $OUT/nginx/scgi;
    upstream cucm {
        server 127.0.0.1:$P_SIM;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://cucm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
}

# wrk_peak SCENARIO PORT MODE RUN: one peak run, appended as JSON to peak.jsonl.
wrk_peak() {
    local scenario=$1 port=$2 mode=$3 run=$4 raw sim_before sim_after
    raw="$OUT/wrk-$scenario-$run.txt"
    sim_before=$(sim_queries)
    BC_MODE=$mode BC_DEVICES=$DEVICES taskset -c "$GEN_CPU" \
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$OUT/bc.lua" "http://127.0.0.1:$port" >"$raw"
    sim_after=$(sim_queries)
    awk -v scenario="$scenario" -v run="$run" -v sim_calls=$((sim_after - sim_before)) '
        function us(v) {
            if (v ~ /us$/) return v + 0;
            if (v ~ /ms$/) return v * 1000;
            if (v ~ /s$/) return v * 1000000;
            return v + 0;
        }
        /^ +50%/ { p50 = us($2) }
        /^ +99%/ { p99 = us($2) }
        /requests in/ { requests = $1 }
        /^Requests\/sec:/ { rps = $2 }
        /Non-2xx/ { non2xx = $NF }
        /Socket errors/ { errors = $0 }
        END {
            printf "{\"scenario\":\"%s\",\"run\":%d,\"rps\":%s,\"requests\":%d,\"p50_us\":%d,\"p99_us\":%d,\"non2xx\":%d,\"sim_calls\":%d,\"socket_errors\":\"%s\"}\n",
                scenario, run, rps, requests, p50, p99, non2xx + 0, sim_calls, errors
        }' "$raw" >>"$OUT/peak.jsonl"
}

# Device-user queries the latency simulator has received so far.
sim_queries() {
    curl -fsS "$LAT_SIM_STATS?log=false" | jq '.calls_device_user_query'
}

# load_fixed SCENARIO PORT MODE RATE RUN: one open-loop run, appended to fixed.jsonl.
load_fixed() {
    local scenario=$1 port=$2 mode=$3 rate=$4 run=$5
    taskset -c "$GEN_CPU" "$BIN/bc-load" --url "http://127.0.0.1:$port" --mode "$mode" \
        --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" --connections "$CONNS" \
        --devices "$DEVICES" |
        jq -c --arg scenario "$scenario" --argjson run "$run" '. + {scenario: $scenario, run: $run}' \
            >>"$OUT/fixed.jsonl"
}

# median FILE SCENARIO FIELD
median() {
    jq -s --arg s "$2" --arg f "$3" \
        '[.[] | select(.scenario == $s) | .[$f]] | sort | if length == 0 then 0 else .[(length - 1) / 2 | floor] end' "$1"
}

SCENARIOS=(direct nginx gateway cache)
declare -A PORT=([direct]=$P_SIM [nginx]=$P_NGINX [gateway]=$P_GW_PASS [cache]=$P_GW_CACHE)
declare -A MODE=([direct]=em [nginx]=em [gateway]=northbound [cache]=northbound)

stage_latency() {
    log "== latency: direct / nginx / gateway pass-through / gateway cache"
    write_wrk_script
    write_nginx_config
    start_sim sim-latency "$P_SIM" --devices "$DEVICES" --users "$DEVICES"
    LAT_SIM_STATS=$SIM_STATS
    wait_port "$P_SIM"
    port_free "$P_NGINX"
    start nginx "$SUT_CPU" nginx -p "$OUT/nginx" -e "$OUT/nginx/error.log" -c "$OUT/nginx/nginx.conf"
    NGINX_PID=$STARTED_PID
    wait_port "$P_NGINX"
    # Pass-through: no cache, no rate limit, a cap CUCM's gate would never see reached.
    gateway_config "$OUT/gateway-pass.toml" "$P_GW_PASS" "$P_SIM" 'workers = 1' -- \
        'max_concurrent = 100' 'max_requests_per_second = 0' 'cache_ttl_ms = 0' 'queue_limit = 100000'
    start_gateway gateway-pass "$OUT/gateway-pass.toml" "$P_GW_PASS"
    # Cache: a TTL longer than the run, so every measured answer is a hit.
    gateway_config "$OUT/gateway-cache.toml" "$P_GW_CACHE" "$P_SIM" 'workers = 1' -- \
        'max_concurrent = 100' 'max_requests_per_second = 0' 'cache_ttl_ms = 3600000' 'queue_limit = 100000'
    local pass_pid=$GW_PID
    start_gateway gateway-cache "$OUT/gateway-cache.toml" "$P_GW_CACHE"
    CACHE_GW_PID=$GW_PID
    GW_PID=$pass_pid

    log "sanity and warm-up (every answer must be a success)"
    local scenario run rate
    for scenario in "${SCENARIOS[@]}"; do
        taskset -c "$GEN_CPU" "$BIN/bc-load" --url "http://127.0.0.1:${PORT[$scenario]}" \
            --mode "${MODE[$scenario]}" --rate 2000 --duration 2 --warmup 0.5 \
            --connections "$CONNS" --devices "$DEVICES" >"$OUT/sanity-$scenario.json"
        jq -e '.errors == 0 and .unexpected == 0' "$OUT/sanity-$scenario.json" >/dev/null ||
            die "$scenario: errors or unexpected answers in the warm-up: $(cat "$OUT/sanity-$scenario.json")"
    done

    other_work "before peak"
    for run in $(seq 1 "$RUNS"); do
        for scenario in "${SCENARIOS[@]}"; do
            log "peak run $run/$RUNS: $scenario"
            wrk_peak "$scenario" "${PORT[$scenario]}" "${MODE[$scenario]}" "$run"
        done
    done
    other_work "after peak"

    if [ -n "${FIXED_RATE:-}" ]; then
        rate=$FIXED_RATE
    else
        rate=$(jq -s '[.[] | select(.scenario == "nginx" or .scenario == "gateway")] as $runs
            | [("nginx", "gateway") as $s | [$runs[] | select(.scenario == $s) | .rps] | sort | .[(length - 1) / 2 | floor]]
            | min / 2 | floor' "$OUT/peak.jsonl")
    fi
    log "fixed rate: $rate req/s (half the lower pass-through peak unless FIXED_RATE)"
    echo "$rate" >"$OUT/fixed-rate.txt"
    for run in $(seq 1 "$RUNS"); do
        for scenario in "${SCENARIOS[@]}"; do
            log "fixed-rate run $run/$RUNS: $scenario"
            load_fixed "$scenario" "${PORT[$scenario]}" "${MODE[$scenario]}" "$rate" "$run"
        done
    done
    other_work "after fixed rate"
    local pid
    for pid in "$GW_PID" "$CACHE_GW_PID" "$NGINX_PID" "$SIM_PID"; do stop "$pid"; done
    print_latency_tables "$rate"
}

print_latency_tables() {
    local rate=$1 s
    {
        echo
        echo "PEAK (wrk -t1 -c$CONNS -d${DURATION}s, median of $RUNS)"
        printf '%-10s %12s %10s %10s %12s\n' scenario req/s p50_ms p99_ms sim_calls/req
        for s in "${SCENARIOS[@]}"; do
            printf '%-10s %12.0f %10.3f %10.3f %12s\n' "$s" "$(median "$OUT/peak.jsonl" "$s" rps)" \
                "$(jq -n "$(median "$OUT/peak.jsonl" "$s" p50_us) / 1000")" \
                "$(jq -n "$(median "$OUT/peak.jsonl" "$s" p99_us) / 1000")" \
                "$(jq -s --arg s "$s" '[.[] | select(.scenario == $s)] | (map(.sim_calls) | add) / (map(.requests) | add) * 1000 | round / 1000' "$OUT/peak.jsonl")"
        done
        echo
        echo "FIXED RATE $rate req/s (bc-load open loop, $CONNS connections, ${DURATION}s, median of $RUNS)"
        printf '%-10s %12s %10s %10s %10s %8s\n' scenario achieved p50_ms p99_ms p99.9_ms errors
        for s in "${SCENARIOS[@]}"; do
            printf '%-10s %12.0f %10.3f %10.3f %10.3f %8s\n' "$s" "$(median "$OUT/fixed.jsonl" "$s" achieved_rate)" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$s" p50_us) / 1000")" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$s" p99_us) / 1000")" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$s" p999_us) / 1000")" \
                "$(jq -s --arg s "$s" '[.[] | select(.scenario == $s) | .errors + .unexpected] | add' "$OUT/fixed.jsonl")"
        done
        local d n g c
        d=$(median "$OUT/peak.jsonl" direct rps)
        n=$(median "$OUT/peak.jsonl" nginx rps)
        g=$(median "$OUT/peak.jsonl" gateway rps)
        c=$(median "$OUT/peak.jsonl" cache rps)
        echo
        echo "RATIOS (medians)"
        echo "  pass-through throughput gateway/nginx:  $(jq -n "$g / $n * 100 | round / 100")   (target >= 1.0)"
        echo "  pass-through throughput gateway/direct: $(jq -n "$g / $d * 100 | round / 100")"
        echo "  cache-hit throughput cache/nginx:       $(jq -n "$c / $n * 100 | round / 100")   (target >= 3.0)"
        echo "  added p99 at $rate req/s, gateway - direct: $(jq -n "($(median "$OUT/fixed.jsonl" gateway p99_us) - $(median "$OUT/fixed.jsonl" direct p99_us)) / 1000") ms (target <= 1 ms)"
        echo "  added p99 at $rate req/s, nginx - direct:   $(jq -n "($(median "$OUT/fixed.jsonl" nginx p99_us) - $(median "$OUT/fixed.jsonl" direct p99_us)) / 1000") ms"
    } | tee "$OUT/latency-tables.txt"
}

# ---------------------------------------------------------------- stage: storm
stage_storm() {
    log "== storm: cucm-sim --max-concurrent 5 --latency-ms 100"
    start_sim sim-storm "$P_STORM_SIM" --devices "$DEVICES" --users "$DEVICES" --max-concurrent 5 --latency-ms 100
    local stats=$SIM_STATS run
    wait_port "$P_STORM_SIM"
    # The storm needs more than the default 15 s deadline (the physical minimum is
    # 20 s); the cache TTL must outlast the first pass over 1,000 devices (also 20 s).
    gateway_config "$OUT/gateway-storm.toml" "$P_STORM_GW" "$P_STORM_SIM" 'deadline_ms = 60000' -- \
        'max_concurrent = 5' 'max_requests_per_second = 0' 'cache_ttl_ms = 60000'
    other_work "before storm"
    for run in $(seq 1 "$RUNS"); do
        start_gateway gateway-storm-$run "$OUT/gateway-storm.toml" "$P_STORM_GW"
        log "login storm run $run/$RUNS: 1,000 logins at once"
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$P_STORM_GW" login \
            --devices "$DEVICES" --sim-stats "$stats" | jq -c --argjson run "$run" '. + {run: $run}' \
            | tee -a "$OUT/storm.jsonl" >&2
        log "logout storm run $run/$RUNS: 1,000 logouts at once"
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$P_STORM_GW" login --logout \
            --devices "$DEVICES" --sim-stats "$stats" | jq -c --argjson run "$run" '. + {run: $run}' \
            | tee -a "$OUT/storm.jsonl" >&2
        stop "$GW_PID"
        # A fresh gateway: the query storm starts from an empty cache.
        start_gateway gateway-query-$run "$OUT/gateway-storm.toml" "$P_STORM_GW"
        log "query storm run $run/$RUNS: 100,000 getloggedinuser over 1,000 devices"
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$P_STORM_GW" query \
            --devices "$DEVICES" --requests 100000 --connections 1000 --sim-stats "$stats" |
            jq -c --argjson run "$run" '. + {run: $run}' | tee -a "$OUT/storm.jsonl" >&2
        stop "$GW_PID"
    done
    other_work "after storm"
    stop "$SIM_PID"
    {
        echo
        echo "STORMS (median of $RUNS; sim --max-concurrent 5 --latency-ms 100; gateway max_concurrent 5, rps 0, deadline 60 s)"
        local kind
        for kind in login_storm logout_storm; do
            printf '%-13s elapsed %6.2f s  min %5.1f s  ratio %5.3f  code26-to-callers %s  not-success %s  sim max_concurrent_ops %s  sim busy answers %s\n' \
                "$kind" "$(median "$OUT/storm.jsonl" "$kind" elapsed_s)" \
                "$(median "$OUT/storm.jsonl" "$kind" physical_min_s)" \
                "$(median "$OUT/storm.jsonl" "$kind" ratio_to_min)" \
                "$(jq -s --arg k "$kind" '[.[] | select(.scenario == $k) | .code26_to_callers] | add' "$OUT/storm.jsonl")" \
                "$(jq -s --arg k "$kind" '[.[] | select(.scenario == $k) | .not_success] | add' "$OUT/storm.jsonl")" \
                "$(jq -s --arg k "$kind" '[.[] | select(.scenario == $k) | .sim_max_concurrent_ops] | max' "$OUT/storm.jsonl")" \
                "$(median "$OUT/storm.jsonl" "$kind" sim_busy_answers)"
        done
        printf '%-13s elapsed %6.2f s  CUCM deviceUserQuery calls %s (ideal 1000, max over runs %s)  not-success %s\n' \
            query_storm "$(median "$OUT/storm.jsonl" query_storm elapsed_s)" \
            "$(median "$OUT/storm.jsonl" query_storm sim_calls_device_user_query)" \
            "$(jq -s '[.[] | select(.scenario == "query_storm") | .sim_calls_device_user_query] | max' "$OUT/storm.jsonl")" \
            "$(jq -s '[.[] | select(.scenario == "query_storm") | .not_success] | add' "$OUT/storm.jsonl")"
    } | tee "$OUT/storm-tables.txt"
}

# ---------------------------------------------------------------- stage: memory
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

stage_memory() {
    log "== memory: 100,000 devices cached, 10,000 client connections"
    start_sim sim-memory "$P_MEM_SIM" --devices 100000
    wait_port "$P_MEM_SIM"
    gateway_config "$OUT/gateway-memory.toml" "$P_MEM_GW" "$P_MEM_SIM" -- \
        'max_concurrent = 64' 'max_requests_per_second = 0' 'cache_ttl_ms = 3600000'
    start_gateway gateway-memory "$OUT/gateway-memory.toml" "$P_MEM_GW"
    local idle filled
    idle=$(rss_kib "$GW_PID")
    log "filling the cache: 100,000 getloggedinuser, one per device"
    taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$P_MEM_GW" fill --devices 100000 \
        --connections 64 | tee "$OUT/memory-fill.json" >&2
    jq -e '.not_success == 0' "$OUT/memory-fill.json" >/dev/null || die "cache fill had failures"
    filled=$(rss_kib "$GW_PID")
    log "holding 10,000 connections"
    taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$P_MEM_GW" hold --connections 10000 \
        --seconds 10 --pid "$GW_PID" | tee "$OUT/memory-hold.json" >&2
    stop "$GW_PID"
    stop "$SIM_PID"
    {
        echo
        echo "MEMORY (gateway VmRSS; workers = 0 → $(nproc) HTTP workers)"
        printf '  idle after start:                          %8.1f MiB\n' "$(jq -n "$idle / 1024")"
        printf '  100,000 devices cached:                    %8.1f MiB\n' "$(jq -n "$filled / 1024")"
        printf '  + 10,000 client connections (peak):        %8.1f MiB  (target <= 64 MiB; connections failed: %s, server fds peak: %s)\n' \
            "$(jq '.rss_peak_kib / 1024' "$OUT/memory-hold.json")" \
            "$(jq '.connections_failed' "$OUT/memory-hold.json")" "$(jq '.server_fds_peak' "$OUT/memory-hold.json")"
    } | tee "$OUT/memory-tables.txt"
}

# ---------------------------------------------------------------- stage: history
# What the request history costs, side by side in one run, every gateway on the same
# core with `workers = 1` against one simulator:
#   cache-off / cache-on     the cache-hit peak (every answer from a warm cache) with
#                            [history] enabled = false vs the default (cache hits are
#                            counted, not recorded); then open-loop latency at
#                            HISTORY_RATE req/s (default 5000).
#   pass-off / pass-on       the pass-through peak (cache_ttl_ms = 0, no rate limit, the
#                            zero-latency simulator: every request reaches "CUCM" and is
#                            recorded), far beyond what a real CUCM lets through.
#   cache-all                record_cache_hits = true, flooded at its peak by wrk while
#                            1,000 logins then 1,000 logouts arrive at once (bc-storm):
#                            every login and logout must be recorded (lane "kept": 0
#                            dropped); cache hits may be dropped (lane "best_effort").
# utime + stime, in clock ticks, of a /proc/.../stat file (fields 14 and 15; the command
# name in field 2 has no spaces here).
ticks() { awk '{print $14 + $15}' "$1"; }
# history_counter PORT written|kept|best_effort: bc_history_written_total, or
# bc_history_dropped_total of that lane, of the gateway on PORT.
history_counter() {
    curl -fsS "http://127.0.0.1:$1/metrics" | awk -v which="$2" '
        which == "written" && $1 == "bc_history_written_total" { print $2 }
        which != "written" && $1 == "bc_history_dropped_total{lane=\"" which "\"}" { print $2 }'
}
# history_settled PORT: wait (at most ~30 s) until the gateway's writer has written what
# was queued: its written count stands still across one write interval (500 ms).
history_settled() {
    local try
    for try in $(seq 1 50); do
        [ "$(history_counter "$1" written)" = "$(sleep 0.6; history_counter "$1" written)" ] && return
    done
}
# history_count PORT QUERY: entries /api/history answers for QUERY (at most 1000).
history_count() { curl -fsS "http://127.0.0.1:$1/api/history?$2&limit=1000" | jq '.entries | length'; }

stage_history() {
    log "== history: cost at the cache-hit and pass-through peaks, a change storm under a cache-hit flood, open-loop latency"
    local p_sim=$((PORT_BASE + 30))
    local cached=('max_concurrent = 100' 'max_requests_per_second = 0' 'cache_ttl_ms = 3600000' 'queue_limit = 100000')
    local pass=('max_concurrent = 100' 'max_requests_per_second = 0' 'cache_ttl_ms = 0' 'queue_limit = 100000')
    local scenarios=(cache-off cache-on pass-off pass-on cache-all)
    declare -A port=([cache-off]=$((PORT_BASE + 31)) [cache-on]=$((PORT_BASE + 32)) [pass-off]=$((PORT_BASE + 33))
        [pass-on]=$((PORT_BASE + 34)) [cache-all]=$((PORT_BASE + 35)))
    declare -A settings=([cache-off]='enabled = false' [pass-off]='enabled = false'
        [cache-on]="path = \"$OUT/history-cache-on.sqlite\""
        [pass-on]="path = \"$OUT/history-pass-on.sqlite\""
        [cache-all]="path = \"$OUT/history-cache-all.sqlite\"
record_cache_hits = true")
    write_wrk_script
    start_sim sim-history "$p_sim" --devices "$DEVICES" --users "$DEVICES"
    LAT_SIM_STATS=$SIM_STATS
    local sim_pid=$SIM_PID sim_stats=$SIM_STATS
    wait_port "$p_sim"
    local scenario run
    declare -A pid
    for scenario in "${scenarios[@]}"; do
        if [[ $scenario == pass-* ]]; then
            gateway_config "$OUT/gateway-$scenario.toml" "${port[$scenario]}" "$p_sim" 'workers = 1' \
                '[history]' "${settings[$scenario]}" -- "${pass[@]}"
        else
            gateway_config "$OUT/gateway-$scenario.toml" "${port[$scenario]}" "$p_sim" 'workers = 1' \
                '[history]' "${settings[$scenario]}" -- "${cached[@]}"
        fi
        start_gateway "$scenario" "$OUT/gateway-$scenario.toml" "${port[$scenario]}"
        pid[$scenario]=$GW_PID
        taskset -c "$GEN_CPU" "$BIN/bc-load" --url "http://127.0.0.1:${port[$scenario]}" \
            --mode northbound --rate 2000 --duration 2 --warmup 0.5 \
            --connections "$CONNS" --devices "$DEVICES" >"$OUT/sanity-$scenario.json"
        jq -e '.errors == 0 and .unexpected == 0' "$OUT/sanity-$scenario.json" >/dev/null ||
            die "$scenario: errors or unexpected answers in the warm-up: $(cat "$OUT/sanity-$scenario.json")"
    done

    # 1. Peaks, interleaved; the recording gateways' CPU, their writer thread's, and
    #    their counters before and after.
    other_work "before history peak"
    local peak_scenarios=(cache-off cache-on pass-off pass-on)
    local recording=(cache-on pass-on)
    declare -A writer_task cpu_before writer_before written_before kept_before
    for scenario in "${recording[@]}"; do
        writer_task[$scenario]=$(grep -lx history-writer /proc/"${pid[$scenario]}"/task/*/comm | head -n1 | xargs dirname)
        [ -n "${writer_task[$scenario]}" ] || die "no history-writer thread in $scenario"
        cpu_before[$scenario]=$(ticks /proc/"${pid[$scenario]}"/stat)
        writer_before[$scenario]=$(ticks "${writer_task[$scenario]}/stat")
        written_before[$scenario]=$(history_counter "${port[$scenario]}" written)
        kept_before[$scenario]=$(history_counter "${port[$scenario]}" kept)
    done
    for run in $(seq 1 "$RUNS"); do
        for scenario in "${peak_scenarios[@]}"; do
            log "history peak run $run/$RUNS: $scenario"
            wrk_peak "$scenario" "${port[$scenario]}" northbound "$run"
        done
    done
    for scenario in "${recording[@]}"; do history_settled "${port[$scenario]}"; done
    declare -A cpu_ticks writer_ticks written_peak kept_peak
    for scenario in "${recording[@]}"; do
        cpu_ticks[$scenario]=$(($(ticks /proc/"${pid[$scenario]}"/stat) - ${cpu_before[$scenario]}))
        writer_ticks[$scenario]=$(($(ticks "${writer_task[$scenario]}/stat") - ${writer_before[$scenario]}))
        written_peak[$scenario]=$(($(history_counter "${port[$scenario]}" written) - ${written_before[$scenario]}))
        kept_peak[$scenario]=$(($(history_counter "${port[$scenario]}" kept) - ${kept_before[$scenario]}))
    done
    other_work "after history peak"

    # 2. The change storm under a saturating cache-hit flood, RUNS times.
    local p=${port[cache-all]} since before_kept before_best flood
    for run in $(seq 1 "$RUNS"); do
        since=$(date -u +%Y-%m-%dT%H:%M:%S.000Z)
        before_kept=$(history_counter "$p" kept)
        before_best=$(history_counter "$p" best_effort)
        log "history storm run $run/$RUNS: wrk flood on cache-all, 1,000 logins then 1,000 logouts"
        BC_MODE=northbound BC_DEVICES=$DEVICES taskset -c "$GEN_CPU" \
            wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$OUT/bc.lua" "http://127.0.0.1:$p" >"$OUT/wrk-flood-$run.txt" &
        flood=$!
        sleep 1
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$p" login \
            --devices "$DEVICES" --sim-stats "$sim_stats" >"$OUT/storm-login-$run.json"
        taskset -c "$GEN_CPU" "$BIN/bc-storm" --gateway "127.0.0.1:$p" login --logout \
            --devices "$DEVICES" --sim-stats "$sim_stats" >"$OUT/storm-logout-$run.json"
        wait "$flood"
        history_settled "$p"
        jq -nc --argjson run "$run" \
            --argjson logins_ok "$(jq '.devices - .not_success' "$OUT/storm-login-$run.json")" \
            --argjson logouts_ok "$(jq '.devices - .not_success' "$OUT/storm-logout-$run.json")" \
            --argjson logins_recorded "$(history_count "$p" "operation=login&code=0&since=$since")" \
            --argjson logouts_recorded "$(history_count "$p" "operation=logout&code=0&since=$since")" \
            --argjson kept_dropped "$(($(history_counter "$p" kept) - before_kept))" \
            --argjson cache_hits_dropped "$(($(history_counter "$p" best_effort) - before_best))" \
            --argjson flood_rps "$(awk '/^Requests\/sec:/ {print $2}' "$OUT/wrk-flood-$run.txt")" \
            '{run: $run, logins_ok: $logins_ok, logins_recorded: $logins_recorded, logouts_ok: $logouts_ok,
              logouts_recorded: $logouts_recorded, kept_dropped: $kept_dropped,
              cache_hits_dropped: $cache_hits_dropped, flood_rps: $flood_rps}' | tee -a "$OUT/history-storm.jsonl" >&2
    done
    other_work "after history storm"

    # 3. Open-loop latency on the cache-hit path.
    local rate=${HISTORY_RATE:-5000} fixed_scenarios=(cache-off cache-on)
    for run in $(seq 1 "$RUNS"); do
        for scenario in "${fixed_scenarios[@]}"; do
            log "history fixed-rate run $run/$RUNS: $scenario at $rate req/s"
            load_fixed "$scenario" "${port[$scenario]}" northbound "$rate" "$run"
        done
    done
    other_work "after history fixed rate"
    for scenario in "${scenarios[@]}"; do stop "${pid[$scenario]}"; done
    stop "$sim_pid"

    local tick_us=$((1000000 / $(getconf CLK_TCK)))
    local off
    # best SCENARIO: the fastest peak run's req/s.
    best() { jq -s --arg s "$1" '[.[] | select(.scenario == $s) | .rps] | max' "$OUT/peak.jsonl"; }
    {
        echo "HISTORY: peaks (wrk -t1 -c$CONNS -d${DURATION}s, median of $RUNS, interleaved; workers = 1 on CPU $SUT_CPU)"
        printf '  %-10s %8s %6s %8s %6s %8s %8s %10s %8s %7s %8s   %s\n' scenario req/s vs_off best best_vs p50_ms p99_ms written "kept drop" writer "µs/rec" "per run req/s"
        for scenario in "${peak_scenarios[@]}"; do
            local written=- kept=- share=- per_record=-
            off=${scenario%-*}-off
            if [[ $scenario == *-on ]]; then
                written=${written_peak[$scenario]}
                kept=${kept_peak[$scenario]}
                share="$((writer_ticks[$scenario] * 100 / (cpu_ticks[$scenario] > 0 ? cpu_ticks[$scenario] : 1)))%"
                [ "$written" -gt 0 ] &&
                    per_record=$(jq -n "${writer_ticks[$scenario]} * $tick_us / $written * 100 | round / 100")
            fi
            printf '  %-10s %8.0f %6.3f %8.0f %6.3f %8.3f %8.3f %10s %8s %7s %8s   %s\n' "$scenario" \
                "$(median "$OUT/peak.jsonl" "$scenario" rps)" \
                "$(jq -n "$(median "$OUT/peak.jsonl" "$scenario" rps) / $(median "$OUT/peak.jsonl" "$off" rps) * 1000 | round / 1000")" \
                "$(best "$scenario")" \
                "$(jq -n "$(best "$scenario") / $(best "$off") * 1000 | round / 1000")" \
                "$(jq -n "$(median "$OUT/peak.jsonl" "$scenario" p50_us) / 1000")" \
                "$(jq -n "$(median "$OUT/peak.jsonl" "$scenario" p99_us) / 1000")" \
                "$written" "$kept" "$share" "$per_record" \
                "$(jq -rs --arg s "$scenario" '[.[] | select(.scenario == $s) | .rps | floor] | join(" / ")' "$OUT/peak.jsonl")"
        done
        echo "  (best: the fastest run, the better estimate of capacity when other processes share the machine;"
        echo "   written: records over the peak runs; kept drop: login/logout/CUCM records dropped; writer: the writer thread's share of its gateway's CPU, and its CPU per record written)"
        echo "HISTORY: 1,000 logins then 1,000 logouts at once during a cache-hit flood (wrk -c$CONNS, record_cache_hits = true), per run"
        printf '  %-4s %9s %9s %10s %10s %10s %16s %10s\n' run flood_rps logins recorded logouts recorded "kept dropped" "hits dropped"
        jq -r '[.run, (.flood_rps | floor), .logins_ok, .logins_recorded, .logouts_ok, .logouts_recorded, .kept_dropped, .cache_hits_dropped] | @tsv' \
            "$OUT/history-storm.jsonl" | while IFS=$'\t' read -r r f li lr lo lor kd hd; do
            printf '  %-4s %9s %9s %10s %10s %10s %16s %10s\n' "$r" "$f" "$li" "$lr" "$lo" "$lor" "$kd" "$hd"
        done
        echo "HISTORY: open-loop latency at $rate req/s of cache hits (bc-load, ${DURATION}s, median of $RUNS, interleaved)"
        printf '  %-10s %9s %8s %8s %8s %7s\n' scenario achieved p50_ms p99_ms p999_ms errors
        for scenario in "${fixed_scenarios[@]}"; do
            printf '  %-10s %9.0f %8.3f %8.3f %8.3f %7s\n' "$scenario" \
                "$(median "$OUT/fixed.jsonl" "$scenario" achieved_rate)" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$scenario" p50_us) / 1000")" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$scenario" p99_us) / 1000")" \
                "$(jq -n "$(median "$OUT/fixed.jsonl" "$scenario" p999_us) / 1000")" \
                "$(jq -s --arg s "$scenario" '[.[] | select(.scenario == $s) | .errors + .unexpected] | add' "$OUT/fixed.jsonl")"
        done
        echo "  per run p99_ms: $(for scenario in "${fixed_scenarios[@]}"; do
            printf '%s %s; ' "$scenario" "$(jq -rs --arg s "$scenario" '[.[] | select(.scenario == $s) | .p99_us / 1000] | join(" / ")' "$OUT/fixed.jsonl")"
        done)"
        echo "  load average seen: $(grep -o 'loadavg [0-9. ]*' "$OUT/other-work.txt" | tr '\n' ';')"
    } | tee "$OUT/history-tables.txt" >/dev/null
}

# ---------------------------------------------------------------- main
need_tools
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 12000 ] || die "ulimit -n is $(ulimit -n); the memory scenario needs 12,000 descriptors"
machine_info
build
case "$STAGE" in
all)
    stage_latency
    stage_storm
    stage_memory
    ;;
latency) stage_latency ;;
storm) stage_storm ;;
memory) stage_memory ;;
history) stage_history ;;
esac
log "raw results in $OUT"
for table in latency storm memory history; do
    [ -f "$OUT/$table-tables.txt" ] && cat "$OUT/$table-tables.txt"
done
exit 0
