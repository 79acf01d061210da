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
# Every fuzz target for a bounded time on the stable toolchain (`--sanitizer none`; see
# scripts/fuzz.sh). The first run installs cargo-fuzz and builds the targets (~4 min here).
phase "fuzz (stable, ${EXACTLY_FUZZ_SECONDS:-20} s per target)" env EXACTLY_FUZZ_STABLE=1 bash scripts/fuzz.sh "${EXACTLY_FUZZ_SECONDS:-20}"
