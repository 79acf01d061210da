#!/usr/bin/env bash
# Benchmarks a fresh local 3-node cluster (release build, fsync on) with N no-op jobs and prints
# throughput and latency figures. Usage: scripts/bench.sh [JOBS] [extra `exactly bench` flags]
# PEER_TLS=1 runs the nodes with mutual TLS on their peer ports; API_TLS=1 with TLS and a
# bearer token on the public port (the bench client then uses https and the token).
# THEN="<flags>" runs a second `exactly bench` on the same cluster right after the first, e.g.
# an overload and then the normal rate, to see how fast latency recovers:
#   THEN="--rate 2000 --duration 10s" scripts/bench.sh 1 --rate 10000 --duration 60s --drain 1s
# After each run it prints every node's resident memory (RSS), data directory size and CPU time;
# HOLD=<seconds> waits that long first (snapshots and log purges settle).
# LOGS=<dir> keeps the nodes' logs there (n1.log … n3.log) when the cluster stops; the nodes
# take RUST_LOG from the environment (scripts/commit-timeline.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-100000}
shift || true
# BIN=<dir> runs the binaries in that directory as they are, without building (to compare two
# builds in one hour: copy each build's exactlyd, exactly and exactly-exec-guard aside).
if [[ -n "${BIN:-}" ]]; then
  bin=$BIN
else
  cargo build --release -p exactly-node -p exactly-handlers -p exactly-cli --bins
  bin=${CARGO_TARGET_DIR:-target}/release
fi
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n "${LOGS:-}" ]]; then
    mkdir -p "$LOGS"
    cp "$dir"/n*.log "$LOGS"/ 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
base=$((17000 + RANDOM % 2000))
eps="127.0.0.1:$((base+1)),127.0.0.1:$((base+2)),127.0.0.1:$((base+3))"
# Each node serves node-to-node traffic on its own peer port (`--peer-listen`, base + 10 + i);
# PEER_TLS=1 puts it under mutual TLS with certificates from `exactly cert`.
tls() { :; }
if [[ "${PEER_TLS:-0}" == 1 ]]; then
  "$bin/exactly" cert ca --dir "$dir/certs" >/dev/null
  for i in 1 2 3; do "$bin/exactly" cert node --dir "$dir/certs" --node-id "$i" >/dev/null; done
  tls() { echo --peer-tls-ca "$dir/certs/ca.pem" --peer-tls-cert "$dir/certs/node-$1.pem" --peer-tls-key "$dir/certs/node-$1.key"; }
  echo "peer port under mutual TLS"
fi
api() { :; }
client=("$bin/exactly" --endpoints "$eps")
if [[ "${API_TLS:-0}" == 1 ]]; then
  [[ -f "$dir/certs/ca.pem" ]] || "$bin/exactly" cert ca --dir "$dir/certs" >/dev/null
  "$bin/exactly" cert server --dir "$dir/certs" --name 127.0.0.1 >/dev/null
  out=$("$bin/exactly" token new --name bench --scope admin)
  EXACTLY_TOKEN=$(printf '%s\n' "$out" | sed -n 's/^token: //p')
  export EXACTLY_TOKEN
  printf '%s\n' "$out" | sed -n '/^\[\[tokens\]\]/,$p' >"$dir/tokens.toml"
  api() { echo --api-tls-cert "$dir/certs/api.pem" --api-tls-key "$dir/certs/api.key" --tokens-file "$dir/tokens.toml"; }
  client+=(--ca "$dir/certs/ca.pem")
  echo "public port under TLS with a bearer token"
fi
# shellcheck disable=SC2046 # tls and api print separate flags
"$bin/exactlyd" --init --node-id 1 --listen 127.0.0.1:$((base+1)) --peer-listen 127.0.0.1:$((base+11)) $(tls 1) $(api) --data-dir "$dir/n1" --slots 1024 >"$dir/n1.log" 2>&1 &
pids+=($!)
for i in 2 3; do
  # shellcheck disable=SC2046
  "$bin/exactlyd" --join 127.0.0.1:$((base+11)) --node-id $i --listen 127.0.0.1:$((base+i)) --peer-listen 127.0.0.1:$((base+10+i)) $(tls $i) $(api) --data-dir "$dir/n$i" --slots 1024 >"$dir/n$i.log" 2>&1 &
  pids+=($!)
done
# Wait (at most 30 s) until all three nodes are members and registered.
for _ in $(seq 1 150); do
  n=$("${client[@]}" --json status 2>/dev/null | grep -cE '"incarnation": *[1-9]' || true)
  if [[ "$n" -ge 3 ]]; then break; fi
  sleep 0.2
done
"${client[@]}" bench --jobs "$jobs" "$@"
# What the nodes hold after the run: resident memory, data directory and CPU time (user +
# system, since the node started) per node.
ticks=$(getconf CLK_TCK)
memory() {
  for i in 1 2 3; do
    pid=${pids[$((i - 1))]}
    rss=$(awk '/^VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "?")
    disk=$(du -sm "$dir/n$i" 2>/dev/null | cut -f1)
    # Fields 14 and 15 of /proc/PID/stat (after the command name in parentheses).
    cpu=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk -v t="$ticks" '{printf "%.1f s", ($12 + $13) / t}' || echo "?")
    echo "node $i: RSS $rss, data directory ${disk:-?} MiB, CPU ${cpu:-?}"
  done
}
if [[ -n "${HOLD:-}" ]]; then
  # HOLD=<seconds>: let retention, snapshots and log purges settle before measuring.
  sleep "$HOLD"
fi
memory
if [[ -n "${THEN:-}" ]]; then
  echo
  echo "then, on the same cluster: exactly bench $THEN"
  # shellcheck disable=SC2086 # THEN is a list of flags
  "${client[@]}" bench --jobs "$jobs" $THEN
  memory
fi
