#!/usr/bin/env bash
# Verifies everything without editing files: formatting, lints, and every test.
# Slow suites are bounded in time; EXACTLY_LONG=1 runs longer sweeps where tests offer them.
# Prints each phase's time at the end (also when a phase fails).
set -euo pipefail
cd "$(dirname "$0")/.."
phases=()
started=$SECONDS
report() {
  echo
  echo "phase times:"
  for p in "${phases[@]}"; do echo "  $p"; done
  echo "  total: $((SECONDS - started)) s"
}
trap report EXIT
phase() { # name command...
  local name=$1 t=$SECONDS
  shift
  "$@" || { phases+=("$name: $((SECONDS - t)) s (failed)"); return 1; }
  phases+=("$name: $((SECONDS - t)) s")
}
phase "cargo fmt --check" cargo fmt --all -- --check
phase "cargo clippy -D warnings" cargo clippy --workspace --all-targets -- -D warnings
phase "cargo test --workspace" cargo test --workspace
