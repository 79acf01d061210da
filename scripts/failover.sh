#!/usr/bin/env bash
# Measures failover on a fresh local 3-node cluster (release build, default timings):
#  1. worker SIGKILL -> the job it was running is running again on another node;
#  2. leader SIGKILL, then leader SIGSTOP (frozen; let go afterwards) -> a newly submitted job
#     completes again (the next acknowledged write); and, in the same runs, the lost leader's
#     own job running again on another node, and how many attempts running on the healthy nodes
#     the failover ended (the goal is none).
# Each is repeated RUNS times (default 10); prints every run, then the median and the max.
# Usage: scripts/failover.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release -p exactly-node -p exactly-handlers -p exactly-cli --bins >&2
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
base=$((19000 + RANDOM % 500))
eps="127.0.0.1:$((base+1)),127.0.0.1:$((base+2)),127.0.0.1:$((base+3))"
declare -A pid
start_node() { # id [extra flags]
  local id=$1; shift
  "$bin/exactlyd" --node-id "$id" --listen "127.0.0.1:$((base+id))" \
    --http-listen "127.0.0.1:$((base+100+id))" --data-dir "$dir/n$id" "$@" \
    >>"$dir/n$id.log" 2>&1 &
  pid[$id]=$!
}
cleanup() {
  for p in "${pid[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM
ex() { "$bin/exactly" --endpoints "$eps" --retry-time 2s "$@"; }
now_ms() { date +%s%3N; }
ready() { # id: /readyz of that node answers 200 (leader known, lease valid, log applied)
  exec 3<>"/dev/tcp/127.0.0.1/$((base+100+$1))" 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
  local status; read -r _ status _ <&3 || true
  exec 3<&- 3>&-
  [[ "$status" == "200" ]]
}
wait_ready() { # every node ready, so each run starts from a whole cluster
  for _ in $(seq 1 600); do
    if ready 1 && ready 2 && ready 3; then return 0; fi
    sleep 0.1
  done
  echo "cluster not ready" >&2; return 1
}
start_node 1 --init
start_node 2 --join "127.0.0.1:$((base+1))"
start_node 3 --join "127.0.0.1:$((base+1))"
wait_ready

summary() { # label values...
  local label=$1; shift
  local sorted; sorted=$(printf '%s\n' "$@" | sort -n)
  local n=$#; local median; median=$(echo "$sorted" | sed -n "$(( (n+1)/2 ))p")
  local max; max=$(echo "$sorted" | tail -1)
  printf '%-28s runs %d  median %s ms  max %s ms\n' "$label" "$n" "$median" "$max"
}

worker=()
for r in $(seq 1 "$runs"); do
  id=$(ex submit --kind sleep --payload 120s)
  node=""
  for _ in $(seq 1 100); do
    node=$(ex --json get "$id" | grep -oE '"node_id": *[0-9]+' | tail -1 | grep -oE '[0-9]+$' || true)
    [[ -n "$node" ]] && break
    sleep 0.05
  done
  leader=$(ex --json status | grep -oE '"leader_id": *[0-9]+' | grep -oE '[0-9]+$')
  if [[ "$node" == "$leader" ]]; then
    # Measure a worker, not the leader: move on to another job.
    ex submit --kind sleep --payload 1ms >/dev/null; continue
  fi
  kill -KILL "${pid[$node]}"; t0=$(now_ms)
  while :; do
    attempts=$(ex --json get "$id" | grep -oE '"node_id": *[0-9]+' | grep -oE '[0-9]+$' | tr '\n' ' ')
    last=$(echo "$attempts" | awk '{print $NF}')
    if [[ "$last" != "$node" ]]; then break; fi
    sleep 0.05
  done
  dt=$(( $(now_ms) - t0 )); worker+=("$dt")
  echo "worker run $r: node $node killed; job $id running on node $last after ${dt} ms"
  start_node "$node"; wait_ready
done

leader_runs=()
leader_rerun=()
healthy_lost=0
stop_runs=()
stop_rerun=()
stop_lost=0
job_node() { # id: the node of the job's latest attempt, if any
  ex --json get "$1" | grep -oE '"node_id": *[0-9]+' | tail -1 | grep -oE '[0-9]+$' || true
}
for r in $(seq 1 $((2 * runs))); do
  # Runs 1..RUNS SIGKILL the leader; RUNS+1..2×RUNS freeze it (SIGSTOP), then let it go on.
  how=KILL; [[ $r -gt $runs ]] && how=STOP
  leader=$(ex --json status | grep -oE '"leader_id": *[0-9]+' | grep -oE '[0-9]+$')
  # Long jobs until one runs on the leader and one on each follower.
  declare -A held=()
  ids=()
  for _ in $(seq 1 30); do
    id=$(ex submit --kind sleep --payload 120s); ids+=("$id")
    for _ in $(seq 1 100); do n=$(job_node "$id"); [[ -n "$n" ]] && break; sleep 0.02; done
    [[ -z "${held[$n]:-}" ]] && held[$n]=$id
    [[ ${#held[@]} == 3 ]] && break
  done
  # Talk to the survivors only: the measure is the cluster's failover, not a client's.
  alive=""
  for i in 1 2 3; do [[ "$i" != "$leader" ]] && alive+="127.0.0.1:$((base+i)),"; done
  alive=${alive%,}
  kill -"$how" "${pid[$leader]}"; t0=$(now_ms)
  while :; do
    if id=$("$bin/exactly" --endpoints "$alive" --retry-time 1s submit --kind noop 2>/dev/null); then
      state=""
      for _ in $(seq 1 100); do
        state=$("$bin/exactly" --endpoints "$alive" --json get "$id" 2>/dev/null | grep -oE '"state": *"[a-z]+"' | grep -oE '[a-z]+"$' || true)
        [[ "$state" == 'succeeded"' ]] && break
        sleep 0.02
      done
      [[ "$state" == 'succeeded"' ]] && break
    fi
    sleep 0.02
  done
  dt=$(( $(now_ms) - t0 ))
  # The lost leader's job, running again elsewhere.
  lj=${held[$leader]}
  while [[ "$("$bin/exactly" --endpoints "$alive" --json get "$lj" 2>/dev/null | grep -oE '"node_id": *[0-9]+' | tail -1 | grep -oE '[0-9]+$')" == "$leader" ]]; do
    sleep 0.05
  done
  rerun=$(( $(now_ms) - t0 ))
  if [[ $how == KILL ]]; then leader_runs+=("$dt"); leader_rerun+=("$rerun"); else stop_runs+=("$dt"); stop_rerun+=("$rerun"); fi
  # Attempts on the healthy nodes: each of their jobs must still run its first attempt.
  lost=0
  for i in 1 2 3; do
    [[ "$i" == "$leader" ]] && continue
    n_attempts=$("$bin/exactly" --endpoints "$alive" --json get "${held[$i]}" | grep -cE '"node_id"' || true)
    state=$("$bin/exactly" --endpoints "$alive" --json get "${held[$i]}" | grep -oE '"state": *"[a-z]+"' | head -1 | grep -oE '[a-z]+"$')
    if [[ "$n_attempts" != 1 || "$state" != 'running"' ]]; then lost=$((lost + 1)); fi
  done
  if [[ $how == KILL ]]; then healthy_lost=$((healthy_lost + lost)); else stop_lost=$((stop_lost + lost)); fi
  new=$("$bin/exactly" --endpoints "$alive" --json status | grep -oE '"leader_id": *[0-9]+' | grep -oE '[0-9]+$')
  echo "leader run $r: leader $leader SIG$how; next write acknowledged and done after ${dt} ms; its job $lj running elsewhere after ${rerun} ms; healthy nodes' attempts ended: $lost; new leader $new"
  "$bin/exactly" --endpoints "$alive" cancel "${ids[@]}" >/dev/null 2>&1 || true
  if [[ $how == KILL ]]; then start_node "$leader"; else kill -CONT "${pid[$leader]}"; fi
  wait_ready
  unset held
done
echo
summary "worker SIGKILL -> re-run" "${worker[@]}"
summary "leader SIGKILL -> jobs flow" "${leader_runs[@]}"
summary "leader SIGKILL -> its job re-run" "${leader_rerun[@]}"
summary "leader SIGSTOP -> jobs flow" "${stop_runs[@]}"
summary "leader SIGSTOP -> its job re-run" "${stop_rerun[@]}"
echo "attempts on healthy nodes ended by the $runs leader kills: $healthy_lost; by the $runs leader freezes: $stop_lost"
