#!/usr/bin/env bash
# A backlog on a fresh local 3-node cluster (release build, fsync on): fills one paused queue
# with JOBS no-op jobs (requests of 1,000), then resumes it and lets it drain. After each tenth
# of the fill and of the drain it prints the rate of that tenth and each node's resident memory
# (RSS) and data directory, so a rate that falls with depth or memory that grows with it shows.
# Usage: scripts/backlog.sh [JOBS]   (default 1,000,000)
# BIN=<dir> runs the binaries in that directory without building; FILL_ONLY=1 stops after the
# fill (the backlog is then measured, not run). EXACTLY_TABLE_STORAGE=disk runs the nodes with
# their job tables on disk (`table-storage = "disk"`).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-1000000}
if [[ -n "${BIN:-}" ]]; then
  bin=$BIN
else
  cargo build --release -p exactly-node -p exactly-handlers -p exactly-cli --bins
  bin=${CARGO_TARGET_DIR:-target}/release
fi
dir=$(mktemp -d)
base=$((19000 + RANDOM % 2000))
ports="$((base + 1)) $((base + 2)) $((base + 3)) $((base + 11)) $((base + 12)) $((base + 13))"
cluster_pid=
cleanup() {
  if [[ -n "$cluster_pid" ]]; then
    kill -TERM "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
EXACTLY_CLUSTER_BIN=$bin EXACTLY_CLUSTER_DATA="$dir/data" EXACTLY_CLUSTER_PORTS=$ports \
  scripts/cluster.sh >"$dir/cluster.log" 2>&1 &
cluster_pid=$!
client=("$bin/exactly" --endpoints "127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))")
for _ in $(seq 1 150); do
  n=$("${client[@]}" --json status 2>/dev/null | grep -cE '"incarnation": *[1-9]' || true)
  if [[ "$n" -ge 3 ]]; then break; fi
  sleep 0.2
done
node_pids() { pgrep -f "exactlyd.*--data-dir $dir/data" || true; }
memory() {
  local line=""
  for pid in $(node_pids); do
    rss=$(awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status" 2>/dev/null || echo "?")
    line+=" ${rss}"
  done
  printf 'RSS MiB:%s; data MiB:' "$line"
  for d in "$dir"/data/*/; do printf ' %s' "$(du -sm "$d" | cut -f1)"; done
  echo
}
pending() {
  "${client[@]}" --json queue list | tr -d ' \n' | grep -o '"name":"backlog"[^}]*' |
    sed -n 's/.*"pending":\([0-9]*\).*"running":\([0-9]*\).*/\1 \2/p'
}
now() { date +%s.%N; }
"${client[@]}" queue configure backlog --pause >/dev/null
tenth=$(((jobs + 9) / 10))
echo "fill: $jobs jobs into the paused queue 'backlog', requests of 1,000"
filled=0
fill_start=$(now)
while [[ $filled -lt $jobs ]]; do
  n=$((jobs - filled < tenth ? jobs - filled : tenth))
  t0=$(now)
  "${client[@]}" submit --kind noop --queue backlog --count "$n" >/dev/null
  t1=$(now)
  filled=$((filled + n))
  printf 'filled %9d: %7.0f jobs/s  ' "$filled" "$(echo "$n / ($t1 - $t0)" | bc -l)"
  memory
done
printf 'fill: %.0f jobs/s overall\n' "$(echo "$jobs / ($(now) - $fill_start)" | bc -l)"
if [[ "${FILL_ONLY:-0}" == 1 ]]; then exit 0; fi
echo "drain: resume the queue"
"${client[@]}" queue configure backlog --resume >/dev/null
drain_start=$(now)
last_t=$drain_start
last_left=$jobs
next=$((jobs - tenth))
while :; do
  read -r p r <<<"$(pending)"
  left=$((p + r))
  t=$(now)
  if [[ $left -le $next || $left -eq 0 ]]; then
    printf 'left %11d: %7.0f jobs/s  ' "$left" "$(echo "($last_left - $left) / ($t - $last_t)" | bc -l)"
    memory
    last_t=$t
    last_left=$left
    next=$((left - tenth))
  fi
  if [[ $left -eq 0 ]]; then break; fi
  sleep 0.2
done
printf 'drain: %.0f jobs/s overall\n' "$(echo "$jobs / ($(now) - $drain_start)" | bc -l)"
