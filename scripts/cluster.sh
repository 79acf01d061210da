#!/usr/bin/env bash
# Starts a local 3-node cluster on embedded defaults (no config file needed) and stops it on
# Ctrl-C or SIGTERM. gRPC API: 127.0.0.1:7101, :7102, :7103 (any node takes any call); the
# dashboard, /healthz, /readyz and /metrics on http://127.0.0.1:8101, :8102, :8103.
# Data lives in .data/ (delete it for a fresh cluster; started again on the same data, it is the
# same cluster with the same jobs). Usage: scripts/cluster.sh [--release]
#
# For tests (README's examples run against this script): EXACTLY_CLUSTER_BIN names a directory
# with the built binaries (no build then), EXACTLY_CLUSTER_DATA the data directory, and
# EXACTLY_CLUSTER_PORTS six ports: the three gRPC ports, then the three HTTP ports.
# EXACTLY_TABLE_STORAGE=disk keeps the nodes' job tables on disk (`table-storage`).
#
# Stopping (Ctrl-C, SIGTERM) sends SIGTERM to every node at once: each drains its running jobs
# (for at most its drain deadline, 20 s) and stops as a member, so the membership is kept. The
# script waits for every node and says how long the stop took; a node still alive 40 s after the
# signal is killed.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=()
if [[ "${1:-}" == "--release" ]]; then profile=release; flags=(--release); fi
if [[ -n "${EXACTLY_CLUSTER_BIN:-}" ]]; then
  bin=$EXACTLY_CLUSTER_BIN
else
  cargo build "${flags[@]}" -p exactly-node -p exactly-cli -p exactly-handlers --bins
  bin=target/$profile
fi
data=${EXACTLY_CLUSTER_DATA:-.data}
read -r -a ports <<<"${EXACTLY_CLUSTER_PORTS:-7101 7102 7103 8101 8102 8103}"
if [[ ${#ports[@]} != 6 ]]; then
  echo "EXACTLY_CLUSTER_PORTS needs six ports (three gRPC, three HTTP), got: ${ports[*]}" >&2
  exit 2
fi
api() { echo "${ports[$(($1 - 1))]}"; }  # node N's gRPC port
http() { echo "${ports[$(($1 + 2))]}"; } # node N's HTTP port
export EXACTLY_ENDPOINTS="127.0.0.1:$(api 1),127.0.0.1:$(api 2),127.0.0.1:$(api 3)"
mkdir -p "$data"
pids=()
stopping=0
# How long the nodes may take to drain and stop before they are killed (drain deadline + 20 s).
stop_wait_s=40

# Whether node $1's GET /readyz answers 200 (bash's /dev/tcp: no curl needed).
ready() {
  local code=""
  { exec 3<>"/dev/tcp/127.0.0.1/$(http "$1")"; } 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  read -r -t 2 _ code _ <&3 || code=""
  exec 3<&-
  [[ "$code" == 200 ]]
}

stop_nodes() {
  [[ $stopping == 1 ]] && return
  stopping=1
  local started=$SECONDS
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 $((stop_wait_s * 10))); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "node (pid $pid) still running ${stop_wait_s} s after SIGTERM: killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  echo "exactly: stopped in $((SECONDS - started)) s (members kept; start again to resume)"
}
trap 'stop_nodes; exit 0' INT TERM
trap stop_nodes EXIT

"$bin/exactlyd" --init --node-id 1 --listen "127.0.0.1:$(api 1)" --http-listen "127.0.0.1:$(http 1)" --data-dir "$data/node-1" >"$data/node-1.log" 2>&1 &
pids+=($!)
for i in 2 3; do
  "$bin/exactlyd" --join "127.0.0.1:$(api 1)" --node-id $i --listen "127.0.0.1:$(api $i)" --http-listen "127.0.0.1:$(http $i)" --data-dir "$data/node-$i" >"$data/node-$i.log" 2>&1 &
  pids+=($!)
done
# Wait (at most 60 s) until all three nodes answer /readyz with 200: a leader is known, each has
# applied what was committed when it started, holds a lease and is not draining.
all_ready=0
for _ in $(seq 1 300); do
  n=0
  for i in 1 2 3; do ready "$i" && n=$((n + 1)); done
  if [[ $n == 3 ]]; then all_ready=1; break; fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a node exited during start-up (see $data/node-N.log)" >&2; exit 1; }
  done
  sleep 0.2
done
"$bin/exactly" status || true
if [[ $all_ready != 1 ]]; then
  echo >&2
  for i in 1 2 3; do
    ready "$i" || echo "node $i is not ready: see $data/node-$i.log and http://127.0.0.1:$(http "$i")/readyz" >&2
  done
  echo "exactly: the cluster did not become ready within 60 s; stopping it" >&2
  exit 1
fi
cat <<MSG

exactly: 3 nodes running and ready (logs in $data/node-N.log).
  gRPC API:  127.0.0.1:$(api 1)  127.0.0.1:$(api 2)  127.0.0.1:$(api 3)
  dashboard: http://127.0.0.1:$(http 1)/  (any node: :$(http 2), :$(http 3))
  HTTP:      http://127.0.0.1:$(http 1)/metrics  (also /healthz, /readyz)
  try:       $bin/exactly submit --kind noop --payload hello
             $bin/exactly status
Ctrl-C stops the cluster.
MSG
# `wait` returns when a signal arrives (the trap then stops the nodes) or when every node exited.
wait || true
