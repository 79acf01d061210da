#!/usr/bin/env bash
# Multi-process chaos run: three exactlyd nodes on loopback, a stream of jobs whose effects go to
# an exactly-sink, random SIGKILL/restart and SIGSTOP/SIGCONT of any node (the leader included),
# then healing and a check (lost, duplicated, stale accepted). Prints the seed and the counts.
#
#   scripts/chaos.sh [SECONDS] [SEED]      # default 300 s and a fresh seed
#   EXACTLY_CHAOS_SEED=... scripts/chaos.sh 60   # replay a seed
set -euo pipefail
cd "$(dirname "$0")/.."
export EXACTLY_CHAOS_SECS="${1:-${EXACTLY_CHAOS_SECS:-300}}"
if [[ -n "${2:-}" ]]; then export EXACTLY_CHAOS_SEED="$2"; fi
cargo build -p exactly-sink -p exactly-node -p exactly-handlers --bins
exec cargo test -p exactly-node --test fencing -- --exact \
  chaos_of_kills_and_pauses_loses_nothing_and_fences_every_stale_effect --nocapture
