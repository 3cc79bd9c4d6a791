#!/usr/bin/env bash
# The load benchmark: builds in release mode, starts `callbridge-sim fake-openai` and callbridge
# (upstream = "openai", pointed at the fake), and runs the load ladder twice:
#   - through callbridge:            sim (as Twilio) -> callbridge -> fake-openai -> back
#   - the floor, without callbridge: sim (as a bridge) -> fake-openai -> back
# Everything shares this machine. Results: bench/results/*.json and bench/results/table.md.
#
# usage: bench/run.sh [--seconds 20] [--ladder "100 250 500 1000"] [--soak-minutes 0]
#   --soak-minutes M  also run 250 calls for M minutes and record callbridge's RSS every 10 s
# environment: BENCH_CB_PORT (18080), BENCH_FAKE_PORT (19090)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=20
LADDER="100 250 500 1000"
SOAK_MINUTES=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
    --ladder) LADDER="$2"; shift 2 ;;
    --soak-minutes) SOAK_MINUTES="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
CB_PORT="${BENCH_CB_PORT:-18080}"
FAKE_PORT="${BENCH_FAKE_PORT:-19090}"
OUT=bench/results
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/soak-rss.tsv

# Thousands of sockets per process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -p callbridge -p callbridge-sim
SIM=target/release/callbridge-sim
CB=target/release/callbridge

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$SIM" fake-openai --port "$FAKE_PORT" > "$OUT/fake-openai.log" 2>&1 &
FAKE_PID=$!
PIDS+=("$FAKE_PID")

# callbridge as an operator would run it, with the OpenAI leg pointed at the fake. The key is
# a dummy: the fake accepts any bearer key. Logs at info, as an operator would run it.
OPENAI_API_KEY=sk-bench-dummy \
CALLBRIDGE__UPSTREAM=openai CALLBRIDGE__TWILIO__VALIDATE_SIGNATURES=false \
CALLBRIDGE__OPENAI__URL="ws://127.0.0.1:$FAKE_PORT/v1/realtime" \
CALLBRIDGE__SERVER__PORT="$CB_PORT" \
CALLBRIDGE__LOG__LEVEL=info \
  "$CB" --config settings.toml > "$OUT/callbridge.log" 2>&1 &
CB_PID=$!
PIDS+=("$CB_PID")

for _ in $(seq 100); do
  grep -q "callbridge ready" "$OUT/callbridge.log" 2>/dev/null && break
  sleep 0.05
done
grep -q "callbridge ready" "$OUT/callbridge.log" || { cat "$OUT/callbridge.log"; exit 1; }
STARTUP=$(grep -o "callbridge ready.*" "$OUT/callbridge.log" | head -1)
sleep 1
RSS_START=$(awk '/VmRSS/ {print $2}' "/proc/$CB_PID/status")

run_load() { # name url calls pid
  local name=$1 url=$2 calls=$3 pid=$4
  local ramp=$((calls * 5))
  echo "== $name: $calls calls for ${SECONDS_PER_RUN} s (ramp $ramp ms)" >&2
  timeout $((SECONDS_PER_RUN + ramp / 1000 + 60)) \
    "$SIM" load --url "$url" --calls "$calls" --seconds "$SECONDS_PER_RUN" --ramp-ms "$ramp" \
      --pid "$pid" --json "$OUT/$name-$calls.json"
  sleep 2
}

for n in $LADDER; do
  run_load floor "ws://127.0.0.1:$FAKE_PORT/v1/realtime" "$n" "$FAKE_PID"
  run_load callbridge "ws://127.0.0.1:$CB_PORT/media-stream" "$n" "$CB_PID"
done
sleep 3
RSS_END=$(awk '/VmRSS/ {print $2}' "/proc/$CB_PID/status")

if [ "$SOAK_MINUTES" -gt 0 ]; then
  echo "== soak: 250 calls for $SOAK_MINUTES min" >&2
  ( while kill -0 "$CB_PID" 2>/dev/null; do
      printf '%s\t%s\n' "$(date +%s)" "$(awk '/VmRSS/ {print $2}' "/proc/$CB_PID/status")"
      sleep 10
    done ) > "$OUT/soak-rss.tsv" &
  SAMPLER=$!
  "$SIM" load --url "ws://127.0.0.1:$CB_PORT/media-stream" --calls 250 \
    --seconds $((SOAK_MINUTES * 60)) --ramp-ms 1250 --pid "$CB_PID" --json "$OUT/soak-250.json"
  sleep 3
  kill "$SAMPLER" 2>/dev/null || true
fi

MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
python3 bench/table.py "$OUT" "$LADDER" "$MACHINE" "$STARTUP" "$RSS_START" "$RSS_END" \
  "bench/run.sh --seconds $SECONDS_PER_RUN --ladder \"$LADDER\" --soak-minutes $SOAK_MINUTES" \
  | tee "$OUT/table.md"
