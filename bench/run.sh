#!/usr/bin/env bash
# The load benchmark, on each OpenAI API callbridge speaks (Realtime and GPT-Live): builds in
# release mode; then, for each API, starts `callbridge-sim fake-openai --api API` and callbridge
# (upstream = "openai", openai.api = API, pointed at the fake) and runs the load ladder twice:
#   - through callbridge:            sim (as Twilio) -> callbridge -> fake -> back
#   - the floor, without callbridge: sim (as a bridge) -> fake -> back
#     (Realtime: session.update + input_audio_buffer.append; GPT-Live: session.start +
#     session.input_audio.append + session.close)
# Everything shares this machine. Results: bench/results/API-*.json, bench/results/table-API.md
# and bench/results/table.md (every API's table).
#
# usage: bench/run.sh [--seconds 20] [--ladder "100 250 500 1000"] [--api realtime|live|both]
#                     [--soak-minutes 0]
#   --api API         which API(s) to measure (default both, Realtime first)
#   --soak-minutes M  also run 250 calls for M minutes per API and record callbridge's RSS
#                     every 10 s
# environment: BENCH_CB_PORT (18080), BENCH_FAKE_PORT (19090), CARGO_TARGET_DIR (target)
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=20
LADDER="100 250 500 1000"
SOAK_MINUTES=0
API=both
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
    --ladder) LADDER="$2"; shift 2 ;;
    --soak-minutes) SOAK_MINUTES="$2"; shift 2 ;;
    --api) API="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$API" in
  realtime|live) APIS="$API" ;;
  both) APIS="realtime live" ;;
  *) echo "--api $API: expected realtime, live or both" >&2; exit 2 ;;
esac
CB_PORT="${BENCH_CB_PORT:-18080}"
FAKE_PORT="${BENCH_FAKE_PORT:-19090}"
OUT=bench/results
mkdir -p "$OUT"
COMMAND="bench/run.sh --seconds $SECONDS_PER_RUN --ladder \"$LADDER\" --api $API --soak-minutes $SOAK_MINUTES"

# Thousands of sockets per process.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -p callbridge -p callbridge-sim
TARGET="${CARGO_TARGET_DIR:-target}"
SIM="$TARGET/release/callbridge-sim"
CB="$TARGET/release/callbridge"

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Stops a process this script started and waits for it (at most 15 s, then SIGKILL).
stop() { # pid
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Waits until FILE contains TEXT (at most 10 s); prints the file and fails otherwise.
wait_for() { # file text
  for _ in $(seq 200); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  cat "$1" >&2
  echo "timed out waiting for \"$2\" in $1" >&2
  return 1
}

MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"

bench_api() { # realtime|live
  local api=$1 path url_setting
  case "$api" in
    realtime) path=/v1/realtime; url_setting=CALLBRIDGE__OPENAI__URL ;;
    live) path=/v1/live/sessions; url_setting=CALLBRIDGE__OPENAI__LIVE_URL ;;
  esac
  local fake_url="ws://127.0.0.1:$FAKE_PORT$path"
  rm -f "$OUT/$api"-*.json "$OUT/$api"-*.log "$OUT/$api"-soak-rss.tsv "$OUT/table-$api.md"
  echo "==== $api: fake-openai --api $api at $fake_url" >&2

  "$SIM" fake-openai --api "$api" --port "$FAKE_PORT" > "$OUT/$api-fake.log" 2>&1 &
  local fake_pid=$!
  PIDS+=("$fake_pid")
  wait_for "$OUT/$api-fake.log" "listening on"

  # callbridge as an operator would run it, with the OpenAI leg pointed at the fake. The key
  # is a dummy: the fake accepts any bearer key. Logs at info, as an operator would run it.
  env OPENAI_API_KEY=sk-bench-dummy \
    CALLBRIDGE__UPSTREAM=openai CALLBRIDGE__TWILIO__VALIDATE_SIGNATURES=false \
    CALLBRIDGE__OPENAI__API="$api" "$url_setting=$fake_url" \
    CALLBRIDGE__SERVER__PORT="$CB_PORT" \
    CALLBRIDGE__LOG__LEVEL=info \
    "$CB" --config settings.toml > "$OUT/$api-callbridge.log" 2>&1 &
  local cb_pid=$!
  PIDS+=("$cb_pid")
  wait_for "$OUT/$api-callbridge.log" "callbridge ready"
  local startup
  startup=$(grep -o "callbridge ready.*" "$OUT/$api-callbridge.log" | head -1)
  sleep 1
  local rss_start
  rss_start=$(awk '/VmRSS/ {print $2}' "/proc/$cb_pid/status")

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
    run_load "$api-floor" "$fake_url" "$n" "$fake_pid"
    run_load "$api-callbridge" "ws://127.0.0.1:$CB_PORT/media-stream" "$n" "$cb_pid"
  done
  sleep 3
  local rss_end
  rss_end=$(awk '/VmRSS/ {print $2}' "/proc/$cb_pid/status")

  if [ "$SOAK_MINUTES" -gt 0 ]; then
    echo "== $api soak: 250 calls for $SOAK_MINUTES min" >&2
    ( while kill -0 "$cb_pid" 2>/dev/null; do
        printf '%s\t%s\n' "$(date +%s)" "$(awk '/VmRSS/ {print $2}' "/proc/$cb_pid/status")"
        sleep 10
      done ) > "$OUT/$api-soak-rss.tsv" &
    local sampler=$!
    "$SIM" load --url "ws://127.0.0.1:$CB_PORT/media-stream" --calls 250 \
      --seconds $((SOAK_MINUTES * 60)) --ramp-ms 1250 --pid "$cb_pid" \
      --json "$OUT/$api-soak-250.json"
    sleep 3
    kill "$sampler" 2>/dev/null || true
  fi

  stop "$cb_pid"
  stop "$fake_pid"
  python3 bench/table.py "$OUT" "$LADDER" "$MACHINE" "$startup" "$rss_start" "$rss_end" \
    "$COMMAND" "$api" > "$OUT/table-$api.md"
  cat "$OUT/table-$api.md"
}

for api in $APIS; do
  bench_api "$api"
done
{ for api in $APIS; do cat "$OUT/table-$api.md"; echo; done; } > "$OUT/table.md"
