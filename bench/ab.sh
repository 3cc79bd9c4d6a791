#!/usr/bin/env bash
# Before/after: the floor, a callbridge built from another commit ("before") and this tree's
# ("after"), run one after the other for each N, so the three share the machine's state.
#
# usage: bench/ab.sh BEFORE_BIN BEFORE_SETTINGS [--seconds 20] [--ladder "100 250 500"]
#   BEFORE_BIN       a release build of callbridge from the other commit, e.g. built with
#                    git worktree add /tmp/before <commit> &&
#                    (cd /tmp/before && cargo build --release -p callbridge)
#   BEFORE_SETTINGS  that commit's settings.toml (it may not know this tree's keys)
# Results: bench/results-ab/*.json and bench/results-ab/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE_BIN=$1; BEFORE_SETTINGS=$2; shift 2
SECS=20; LADDER="100 250 500"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECS="$2"; shift 2 ;;
    --ladder) LADDER="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
OUT=bench/results-ab; mkdir -p $OUT; rm -f $OUT/*.json $OUT/*.log
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release -p callbridge -p callbridge-sim
SIM=target/release/callbridge-sim
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
$SIM fake-openai --port 19191 > $OUT/fake.log 2>&1 &
FAKE=$!; PIDS+=($FAKE)
start() { # bin settings port log
  OPENAI_API_KEY=sk-bench-dummy CALLBRIDGE__UPSTREAM=openai CALLBRIDGE__TWILIO__VALIDATE_SIGNATURES=false \
  CALLBRIDGE__OPENAI__URL="ws://127.0.0.1:19191/v1/realtime" CALLBRIDGE__SERVER__PORT=$3 \
  CALLBRIDGE__LOG__LEVEL=info "$1" --config "$2" > "$4" 2>&1 &
}
start "$BEFORE_BIN" "$BEFORE_SETTINGS" 18181 $OUT/before.log; BEFORE=$!; PIDS+=($BEFORE)
start target/release/callbridge settings.toml 18282 $OUT/after.log; AFTER=$!; PIDS+=($AFTER)
sleep 2
run() { # name url n pid
  local ramp=$(( $3 * 5 ))
  echo "== $1: $3 calls" >&2
  timeout $((SECS + ramp / 1000 + 60)) $SIM load --url "$2" --calls $3 --seconds $SECS \
    --ramp-ms $ramp --pid $4 --json $OUT/$1-$3.json 2>> $OUT/load.log
  sleep 3
}
for n in $LADDER; do
  run floor ws://127.0.0.1:19191/v1/realtime $n $FAKE
  run before ws://127.0.0.1:18181/media-stream $n $BEFORE
  run after ws://127.0.0.1:18282/media-stream $n $AFTER
done
MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
python3 bench/ab_table.py $OUT "$LADDER" "$MACHINE" "bench/ab.sh $BEFORE_BIN $BEFORE_SETTINGS --seconds $SECS --ladder \"$LADDER\"" | tee $OUT/table.md
