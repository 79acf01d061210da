#!/usr/bin/env bash
# Benchmarks a fresh local 3-node cluster (release build, fsync on) with N no-op jobs and prints
# throughput and latency figures. Usage: scripts/bench.sh [JOBS] [extra `exactly bench` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-100000}
shift || true
cargo build --release -p exactly-node -p exactly-handlers -p exactly-cli --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
base=$((17000 + RANDOM % 2000))
eps="127.0.0.1:$((base+1)),127.0.0.1:$((base+2)),127.0.0.1:$((base+3))"
"$bin/exactlyd" --init --node-id 1 --listen 127.0.0.1:$((base+1)) --data-dir "$dir/n1" --slots 1024 >"$dir/n1.log" 2>&1 &
pids+=($!)
for i in 2 3; do
  "$bin/exactlyd" --join 127.0.0.1:$((base+1)) --node-id $i --listen 127.0.0.1:$((base+i)) --data-dir "$dir/n$i" --slots 1024 >"$dir/n$i.log" 2>&1 &
  pids+=($!)
done
# Wait (at most 30 s) until all three nodes are members and registered.
for _ in $(seq 1 150); do
  n=$("$bin/exactly" --endpoints "$eps" --json status 2>/dev/null | grep -cE '"incarnation": *[1-9]' || true)
  if [[ "$n" -ge 3 ]]; then break; fi
  sleep 0.2
done
"$bin/exactly" --endpoints "$eps" bench --jobs "$jobs" "$@"
