#!/usr/bin/env bash
# `sockshare serve` against two baselines written for this benchmark, in the same run, with
# wrk opening a NEW CONNECTION PER REQUEST (Connection: close), 2 built-in workers, loopback.
#
#   bench/serve_bench.sh [BUILD_DIR]        (default: build-bench, a Release build)
#   env: LOADS="1x16 2x64" DURATION=5s ROUNDS=3 FIXED_RATE=4000 ACCEPTS="plain deferred"
#        UNEVEN_RATES="400 600 800 1000 1200" UNEVEN_ROUNDS=3 UNEVEN_DURATION=10
#        UNEVEN_CONNECTIONS="16 32" NODE_LOADS="2x64"
#   (set to empty, LOADS, ACCEPTS, UNEVEN_RATES, UNEVEN_CONNECTIONS or NODE_LOADS skip what
#   they list: LOADS= ACCEPTS= NODE_LOADS= runs only scenario 2)
#
# Scenario 1, uniform tiny requests (wrk, closed loop): connections/s, p50, p99 of
#   reuseport  bench/baseline_reuseport       2 processes, one SO_REUSEPORT listener each
#   shared     bench/baseline_reuseport --shared: the same 2 processes polling one shared
#              listener (EPOLLEXCLUSIVE), the kernel mechanism inherit mode uses, bare
#   inherit    sockshare serve --mode inherit  one shared listener, workers accept (EPOLLEXCLUSIVE)
#   inherit-rp sockshare serve --mode inherit --reuseport: one SO_REUSEPORT listener per worker
#   naive      bench/baseline_naive_dispatch   accept + sendmsg to the next worker, nothing else
#   dispatch   sockshare serve --mode dispatch acks, policy, counters, no connection lost
#              (its default policy, least loaded; dispatch-rr: the same with --policy rr)
# at each wrk load of LOADS (THREADSxCONNECTIONS): 1x16 leaves CPU idle (latency-bound: every
# hop's delay shows), 2x64 keeps both CPUs busy (CPU-bound: every microsecond of work shows).
# ROUNDS interleaved rounds, the median round per configuration is reported, with the median
# over rounds of the within-round ratios against the targets (inherit >= 0.97x reuseport;
# dispatch >= 0.90x reuseport and >= 0.97x naive) and the CPU time per connection of the
# accepting process and of the workers (utime+stime from /proc/PID/stat). All of it once per
# listener setting of ACCEPTS: "plain", then "deferred" (TCP_DEFER_ACCEPT on every server alike).
# Scenario 1b: CPU per connection of the dispatcher and the workers at a fixed rate
# (bench/serve_loadgen, open loop, FIXED_RATE connections/s), per listener setting.
# Scenario 2, uneven work: 5% of requests burn 20 ms of CPU in the worker, dispatch with
# --policy least against SO_REUSEPORT's blind spread (target: p99 at most half), with
# dispatch --policy rr for reference:
#   2a open loop (bench/serve_loadgen): requests due at each rate of UNEVEN_RATES (below
#      saturation), a new connection each; p50/p99 overall, for the short requests and for the
#      burning ones, measured from the time each request was due; UNEVEN_ROUNDS rounds, each
#      with its own arrivals (seed), the median of the within-round ratios reported;
#   2b closed loop (wrk -s bench/burn.lua, 5% drawn at random burn) at each connection count
#      of UNEVEN_CONNECTIONS: wrk's own latency percentiles.
# Scenario 3, Node.js (skipped without node): one HTTP handler in 2 Node processes spread by
# Node's cluster module (bench/baseline_node_cluster.js: round robin through the primary, its
# default, and SCHED_NONE) against the same handler run unchanged as `serve --mode inherit`
# workers (examples/node/inherit_worker.js, socket activation), at each load of NODE_LOADS.
# Every process started here is stopped on exit (trap), whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-bench}
duration=${DURATION:-5s}
loads=${LOADS-"1x16 2x64"}
rounds=${ROUNDS:-3}
uneven_connections=${UNEVEN_CONNECTIONS-"16 32"}
uneven_rates=${UNEVEN_RATES-"400 600 800 1000 1200"}
uneven_rounds=${UNEVEN_ROUNDS:-3}
uneven_duration=${UNEVEN_DURATION:-10}
fixed_rate=${FIXED_RATE:-4000}
node_loads=${NODE_LOADS-"2x64"}
# Each server's listeners in scenarios 1 and 1b, like for like: "plain" (no TCP_DEFER_ACCEPT
# anywhere: serve --defer-accept 0) and "deferred" (TCP_DEFER_ACCEPT 1 s on every server, serve's
# default with its built-in worker). Scenario 2 runs deferred.
accepts=${ACCEPTS-"plain deferred"}
defer_args() { if [ "$1" = deferred ]; then echo "--defer-accept 1"; else echo "--defer-accept 0"; fi; }

command -v wrk >/dev/null || { echo "wrk is missing: scripts/deps.sh installs it" >&2; exit 1; }
tmp=$(mktemp -d)
if ! { cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DSOCKSHARE_BUILD_TESTS=OFF &&
       cmake --build "$build" -j"$(nproc)" --target sockshare_cli baseline_reuseport baseline_naive_dispatch serve_loadgen
     } >"$tmp/build.log" 2>&1; then
  cat "$tmp/build.log" >&2
  rm -rf "$tmp"
  exit 1
fi
cli="$build/cli/sockshare"
loadgen="$build/bench/serve_loadgen"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME KIND COMMAND...: runs a server in the background, waits (bounded) for the line
# that names its port, sets PORT and PID. KIND is "serve" (readiness on --ready-fd 3) or
# "baseline" (a "listening HOST:PORT" line on stdout).
start() {
  local name=$1 kind=$2
  shift 2
  local fifo="$tmp/$name.fifo" line fd
  rm -f "$fifo"
  mkfifo "$fifo"
  exec {fd}<>"$fifo"
  if [ "$kind" = serve ]; then
    # CLI serve --ready-fd 3 OPTIONS...: before any "-- COMMAND"
    "$1" "$2" --ready-fd 3 "${@:3}" 3>"$fifo" 2>>"$tmp/$name.log" &
  else
    "$@" >"$fifo" 2>>"$tmp/$name.log" &
  fi
  PID=$!
  pids+=("$PID")
  PORT=""
  while read -r -t 20 -u "$fd" line; do
    case "$line" in
      "listening "*) [ -n "$PORT" ] || PORT=${line##*:} ;;
    esac
    if [ "$kind" = baseline ] && [ -n "$PORT" ]; then break; fi
    if [ "$line" = ready ]; then break; fi
  done
  exec {fd}<&-
  [ -n "$PORT" ] || { echo "$name did not start; its log:" >&2; cat "$tmp/$name.log" >&2; exit 1; }
}

stop() {
  kill -TERM "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
}

cpu_ticks() {  # utime + stime of a process, in clock ticks
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

worker_ticks() {  # utime + stime of a process's children (the workers), in clock ticks
  local total=0 kid
  for kid in $(ps -o pid= --ppid "$1"); do total=$(( total + $(cpu_ticks "$kid") )); done
  echo "$total"
}

to_us() {  # wrk latency ("812.00us", "1.20ms", "2.00s") -> microseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
    else if (v ~ /s$/) print n * 1000000; else print n }'
}

# run_wrk NAME PORT [wrk args...]: prints "conn_per_s p50_us p90_us p99_us requests"
run_wrk() {
  local name=$1 port=$2
  shift 2
  wrk -d"$duration" --latency -H 'Connection: close' "$@" \
      "http://127.0.0.1:$port/" >"$tmp/$name.wrk" 2>&1
  local rps p50 p90 p99 reqs errors
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$tmp/$name.wrk")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$tmp/$name.wrk")")
  p90=$(to_us "$(awk '$1 == "90%" {print $2}' "$tmp/$name.wrk")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$tmp/$name.wrk")")
  reqs=$(awk '/requests in/ {print $1}' "$tmp/$name.wrk")
  errors=$(awk '/Socket errors|Non-2xx/ {printf "%s; ", $0}' "$tmp/$name.wrk")
  [ -z "$errors" ] || echo "  note ($name): $errors" >&2
  echo "$rps $p50 $p90 $p99 $reqs"
}

echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

ticks=$(getconf CLK_TCK)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "NOT met") }'; }
declare -A results

# measure CONFIG ROUND WRK_ARGS...: one wrk run against the server just started; records
# "conn/s p50 p90 p99 requests dispatcher_ticks worker_ticks"
measure() {
  local config=$1 round=$2 before_d before_w
  shift 2
  before_d=$(cpu_ticks "$PID")
  before_w=$(worker_ticks "$PID")
  results[$config,$round]="$(run_wrk "$config" "$PORT" "$@") $(( $(cpu_ticks "$PID") - before_d )) $(( $(worker_ticks "$PID") - before_w ))"
  stop
}

# median round of a configuration by connections/s
median() {
  local config=$1 round
  for round in $(seq 1 "$rounds"); do echo "${results[$config,$round]}"; done | sort -g -k1 |
    awk -v n="$rounds" 'NR == int((n + 1) / 2)'
}
# Other work on the machine drifts between rounds, so each ratio is taken within a round (the
# configurations of a round run back to back) and the median over rounds is reported.
round_ratios() {  # A B: the per-round ratios of A's conn/s to B's, sorted
  local round
  for round in $(seq 1 "$rounds"); do
    ratio "$(echo "${results[$1,$round]}" | awk '{print $1}')" "$(echo "${results[$2,$round]}" | awk '{print $1}')"
    echo
  done | sort -g
}
median_ratio() { round_ratios "$1" "$2" | awk -v n="$rounds" 'NR == int((n + 1) / 2)'; }
report_ratio() {  # A B TARGET|- LABEL
  local m
  m=$(median_ratio "$1" "$2")
  if [ "$3" = - ]; then  # for information, no target
    printf '%-32s = %s   per round: %s\n' "$4" "$m" "$(round_ratios "$1" "$2" | tr '\n' ' ')"
    return
  fi
  printf '%-32s = %s   per round: %s  target >= %s  %s\n' "$4" "$m" \
    "$(round_ratios "$1" "$2" | tr '\n' ' ')" "$3" "$(verdict "$m" "$3")"
}

# print_table CONFIG...: the median round of each configuration, with every round's conn/s
print_table() {
  local config rps p50 p90 p99 reqs cpu_d cpu_w all us_d us_w
  printf '%-17s %10s %8s %8s %8s %12s %12s  %s\n' config "conn/s" "p50 us" "p90 us" "p99 us" \
    "accepter us" "workers us" "all rounds (conn/s)"
  for config in "$@"; do
    read -r rps p50 p90 p99 reqs cpu_d cpu_w <<<"$(median "$config")"
    all=$(for round in $(seq 1 "$rounds"); do echo "${results[$config,$round]}" | awk '{printf "%s ", $1}'; done)
    # CPU per connection: of the process wrk connects to (the dispatcher, or Node's cluster
    # primary in round robin; for reuseport and inherit the supervisor or parent, which does
    # no per-connection work) and of its workers.
    read -r us_d us_w <<<"$(awk -v d="$cpu_d" -v w="$cpu_w" -v t="$ticks" -v r="$reqs" \
      'BEGIN { printf "%.2f %.2f", d / t * 1e6 / r, w / t * 1e6 / r }')"
    printf '%-17s %10s %8s %8s %8s %12s %12s  %s\n' "$config" "$rps" "$p50" "$p90" "$p99" "$us_d" "$us_w" "$all"
  done
}

for accept in $accepts; do
read -r -a d <<<"$(defer_args "$accept")"
for load in $loads; do
  threads=${load%x*}
  connections=${load#*x}
  wrk_args=(-t"$threads" -c"$connections")
  results=()
  for round in $(seq 1 "$rounds"); do
    start reuseport baseline "$build/bench/baseline_reuseport" --listen 127.0.0.1:0 --workers 2 "${d[@]}"
    measure reuseport "$round" "${wrk_args[@]}"
    start shared baseline "$build/bench/baseline_reuseport" --listen 127.0.0.1:0 --workers 2 --shared "${d[@]}"
    measure shared "$round" "${wrk_args[@]}"
    start inherit serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode inherit "${d[@]}"
    measure inherit "$round" "${wrk_args[@]}"
    start inherit-rp serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode inherit --reuseport "${d[@]}"
    measure inherit-rp "$round" "${wrk_args[@]}"
    start naive baseline "$build/bench/baseline_naive_dispatch" --listen 127.0.0.1:0 --workers 2 "${d[@]}"
    measure naive "$round" "${wrk_args[@]}"
    start dispatch serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch "${d[@]}"
    measure dispatch "$round" "${wrk_args[@]}"
    start dispatch-rr serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch --policy rr "${d[@]}"
    measure dispatch-rr "$round" "${wrk_args[@]}"
  done

  echo "Scenario 1, $accept accept: uniform tiny requests, new connection per request;" \
       "wrk -t$threads -c$connections -d$duration --latency -H 'Connection: close', $rounds rounds"
  print_table reuseport shared inherit inherit-rp naive dispatch dispatch-rr
  echo
  report_ratio inherit reuseport 0.97 "inherit  / reuseport"
  report_ratio inherit shared - "inherit  / shared"
  report_ratio shared reuseport - "shared   / reuseport"
  report_ratio inherit-rp reuseport - "inherit-rp / reuseport"
  report_ratio dispatch reuseport 0.90 "dispatch / reuseport"
  report_ratio dispatch naive 0.97 "dispatch / naive"
  report_ratio naive reuseport - "naive    / reuseport"
  report_ratio dispatch-rr naive - "dispatch-rr / naive"
  echo
done
done

# Scenario 1b: the same comparison at a FIXED connection rate (open loop, serve_loadgen): the
# CPU each configuration's processes use per connection, which background load on a shared
# machine distorts much less than the closed-loop throughput above.
echo "Scenario 1b: CPU per connection at a fixed $fixed_rate conn/s for $uneven_duration s (serve_loadgen, open loop)"
printf '%-10s %-9s %14s %14s %10s %10s\n' config accept "dispatcher us" "workers us" "p50 us" "p99 us"
fixed() {  # NAME: runs serve_loadgen against $PORT/$PID with no burns, prints a row
  local kids out
  kids=$(ps -o pid= --ppid "$PID" | tr -d ' ' | paste -sd, -)
  out=$("$loadgen" --port "$PORT" --rate "$fixed_rate" --duration "$uneven_duration" --burn-percent 0 \
          --cpu-pids "$PID,$kids") || echo "  note ($1): serve_loadgen reported errors" >&2
  echo "$out" | awk -v name="$1" -v disp="$2" -v accept="$accept" '
    $1 == "all" { for (i = 2; i <= NF; ++i) { split($i, kv, "="); v[kv[1]] = kv[2] } }
    $1 == "cpu_us_per_request" { d = 0; w = 0
      for (i = 2; i <= NF; ++i) { split($i, kv, "="); if (i == 2) d = kv[2]; else w += kv[2] } }
    END { printf "%-10s %-9s %14s %14.2f %10s %10s\n", name, accept, disp ? sprintf("%.2f", d) : "-", (disp ? w : w + d), v["p50_us"], v["p99_us"] }'
}
for accept in $accepts; do
  read -r -a d <<<"$(defer_args "$accept")"
  start fixed-reuseport baseline "$build/bench/baseline_reuseport" --listen 127.0.0.1:0 --workers 2 "${d[@]}"
  fixed reuseport 0
  stop
  start fixed-inherit serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode inherit "${d[@]}"
  fixed inherit 0
  stop
  start fixed-naive baseline "$build/bench/baseline_naive_dispatch" --listen 127.0.0.1:0 --workers 2 "${d[@]}"
  fixed naive 1
  stop
  start fixed-dispatch serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch "${d[@]}"
  fixed dispatch 1
  stop
done
echo

# Scenario 2, open loop (serve_loadgen): requests due at a fixed rate, each on a new
# connection, latency measured from the due time; 5% burn 20 ms of worker CPU. Overall p99
# includes the burns themselves (>= 20 ms by construction, and 5% > 1%), so the p99 of the
# short requests is reported too: that is where a request waiting behind a burn shows.
echo "Scenario 2: uneven work, 5% of requests burn 20 ms; open loop, $uneven_duration s per run, $uneven_rounds rounds (seeds RATE*10+ROUND); deferred accept"
printf '%-6s %-5s %-16s %9s %9s %9s %11s %11s %9s\n' rate round config "all p50" "all p99" "all p99.9" "short p50" "short p99" "burn p99"
uneven() {  # RATE ROUND NAME: one serve_loadgen run against $PORT, prints a row, sets P99_ALL P99_SHORT
  local out
  out=$("$loadgen" --port "$PORT" --rate "$1" --duration "$uneven_duration" --burn-percent 5 \
          --burn-ms 20 --seed "$(( $1 * 10 + $2 ))") || echo "  note ($3 at $1/s): serve_loadgen reported errors: $(echo "$out" | head -1)" >&2
  read -r P99_ALL P99_SHORT <<<"$(echo "$out" | awk '
    { for (i = 2; i <= NF; ++i) { split($i, kv, "="); v[$1, kv[1]] = kv[2] } }
    END { print v["all", "p99_us"], v["short", "p99_us"] }')"
  echo "$out" | awk -v rate="$1" -v round="$2" -v name="$3" '
    { for (i = 2; i <= NF; ++i) { split($i, kv, "="); v[$1, kv[1]] = kv[2] } }
    END { printf "%-6s %-5s %-16s %9s %9s %9s %11s %11s %9s\n", rate, round, name, v["all", "p50_us"],
          v["all", "p99_us"], v["all", "p99.9_us"], v["short", "p50_us"], v["short", "p99_us"], v["burn", "p99_us"] }'
}
# the median of numbers one per line; of an even count the upper middle (lower is better here)
median_line() { sort -g | awk '{ v[NR] = $1 } END { printf "%s", v[int(NR / 2) + 1] }'; }
for rate in $uneven_rates; do
  all_ratios="" short_ratios=""
  for round in $(seq 1 "$uneven_rounds"); do
    # Within a round the three configurations get the same arrivals (same seed), back to back.
    start uneven-reuseport baseline "$build/bench/baseline_reuseport" --listen 127.0.0.1:0 --workers 2 --defer-accept 1
    uneven "$rate" "$round" reuseport
    stop
    ra=$P99_ALL rs=$P99_SHORT
    start uneven-least serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch --policy least
    uneven "$rate" "$round" "dispatch+least"
    stop
    la=$P99_ALL ls=$P99_SHORT
    start uneven-rr serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch --policy rr
    uneven "$rate" "$round" "dispatch+rr"
    stop
    all_ratios+="$(ratio "$la" "$ra") " short_ratios+="$(ratio "$ls" "$rs") "
  done
  r_all=$(tr ' ' '\n' <<<"$all_ratios" | grep . | median_line)
  r_short=$(tr ' ' '\n' <<<"$short_ratios" | grep . | median_line)
  echo "       dispatch+least / reuseport at $rate/s: p99 all $r_all (per round: ${all_ratios% };" \
       "target <= 0.50: $(awk -v r="$r_all" 'BEGIN { print (r <= 0.5 ? "met" : "NOT met") }')), p99 short $r_short (per round: ${short_ratios% })"
done
echo

# Scenario 2b, closed loop (wrk): 5% of requests, drawn at random, burn 20 ms.
echo "Scenario 2b: uneven work, 5% of requests burn 20 ms; closed loop, wrk -t1 -d$duration -s bench/burn.lua; deferred accept"
printf '%-6s %-16s %10s %9s %9s %9s\n' conns config "req/s" "p50 us" "p90 us" "p99 us"
for conns in $uneven_connections; do
  row() {  # NAME: one wrk run against $PORT, prints a row, sets P99
    local out
    out=$(run_wrk "$1" "$PORT" -t1 -c"$conns" -s bench/burn.lua)
    read -r rps p50 p90 P99 _ <<<"$out"
    printf '%-6s %-16s %10s %9s %9s %9s\n' "$conns" "$1" "$rps" "$p50" "$p90" "$P99"
    stop
  }
  start wrk-uneven-reuseport baseline "$build/bench/baseline_reuseport" --listen 127.0.0.1:0 --workers 2 --defer-accept 1
  row reuseport
  ra=$P99
  start wrk-uneven-least serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch --policy least
  row dispatch+least
  la=$P99
  start wrk-uneven-rr serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode dispatch --policy rr
  row dispatch+rr
  r_all=$(ratio "$la" "$ra")
  echo "       dispatch+least / reuseport: p99 $r_all (target <= 0.50: $(awk -v r="$r_all" 'BEGIN { print (r <= 0.5 ? "met" : "NOT met") }'))"
done
echo
# Scenario 3, Node.js: the same HTTP handler (examples/node/inherit_worker.js) in 2 processes,
# spread by Node's cluster module (its default round robin through the primary, and
# SCHED_NONE, a listener shared by the workers) or run unchanged as `serve --mode inherit`
# workers by socket activation (one shared listener; --reuseport). Plain accept everywhere.
if [ -n "$node_loads" ] && command -v node >/dev/null; then
  for load in $node_loads; do
    threads=${load%x*}
    connections=${load#*x}
    wrk_args=(-t"$threads" -c"$connections")
    results=()
    for round in $(seq 1 "$rounds"); do
      start node-cluster baseline node bench/baseline_node_cluster.js --listen 127.0.0.1:0 --workers 2
      measure node-cluster "$round" "${wrk_args[@]}"
      start node-cluster-none baseline node bench/baseline_node_cluster.js --listen 127.0.0.1:0 --workers 2 --sched none
      measure node-cluster-none "$round" "${wrk_args[@]}"
      start node-inherit serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode inherit -- node examples/node/inherit_worker.js
      measure node-inherit "$round" "${wrk_args[@]}"
      start node-inherit-rp serve "$cli" serve --listen 127.0.0.1:0 --workers 2 --mode inherit --reuseport -- node examples/node/inherit_worker.js
      measure node-inherit-rp "$round" "${wrk_args[@]}"
    done
    echo "Scenario 3, Node.js workers: new connection per request;" \
         "wrk -t$threads -c$connections -d$duration --latency -H 'Connection: close', $rounds rounds"
    print_table node-cluster node-cluster-none node-inherit node-inherit-rp
    echo
    report_ratio node-inherit node-cluster - "node-inherit / node-cluster"
    report_ratio node-inherit-rp node-cluster - "node-inherit-rp / node-cluster"
    report_ratio node-inherit node-cluster-none - "node-inherit / node-cluster-none"
    echo
  done
elif [ -n "$node_loads" ]; then
  echo "Scenario 3 skipped: node is not installed (scripts/deps.sh installs it)"
  echo
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
