#!/usr/bin/env bash
# Starts a local 3-node cluster on embedded defaults (no config file needed) and stops it on
# Ctrl-C. gRPC API: 127.0.0.1:7101, :7102, :7103 (any node takes any call); the dashboard,
# /healthz, /readyz and /metrics on http://127.0.0.1:8101, :8102, :8103.
# Data lives in .data/ (delete it for a fresh cluster). Usage: scripts/cluster.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=()
if [[ "${1:-}" == "--release" ]]; then profile=release; flags=(--release); fi
cargo build "${flags[@]}" -p exactly-node -p exactly-handlers -p exactly-cli --bins
bin=target/$profile
mkdir -p .data
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
"$bin/exactlyd" --init --node-id 1 --listen 127.0.0.1:7101 --http-listen 127.0.0.1:8101 --data-dir .data/node-1 >.data/node-1.log 2>&1 &
pids+=($!)
for i in 2 3; do
  "$bin/exactlyd" --join 127.0.0.1:7101 --node-id $i --listen 127.0.0.1:710$i --http-listen 127.0.0.1:810$i --data-dir .data/node-$i >.data/node-$i.log 2>&1 &
  pids+=($!)
done
# Wait (at most 30 s) until all three nodes are members and registered.
for _ in $(seq 1 150); do
  n=$("$bin/exactly" --json status 2>/dev/null | grep -cE '"incarnation": *[1-9]' || true)
  if [[ "$n" -ge 3 ]]; then break; fi
  sleep 0.2
done
"$bin/exactly" status || true
cat <<MSG

exactly: 3 nodes running (logs in .data/node-N.log).
  gRPC API:  127.0.0.1:7101  127.0.0.1:7102  127.0.0.1:7103
  dashboard: http://127.0.0.1:8101/  (any node: :8102, :8103)
  HTTP:      http://127.0.0.1:8101/metrics  (also /healthz, /readyz)
  try:       $bin/exactly submit --kind noop --payload hello
             $bin/exactly status
Ctrl-C stops the cluster.
MSG
wait
