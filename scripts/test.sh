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
# The container test's image (a release build and `docker build`), made before the tests so
# that no compiler runs next to the timing-bound tests; the container test uses it as given.
container_image() {
  EXACTLY_DOCKER_IMAGE=$(bash scripts/docker-image.sh | tail -n 1) || return 1
  export EXACTLY_DOCKER_IMAGE
}
if [[ -z "${EXACTLY_DOCKER_IMAGE:-}" ]] && docker info >/dev/null 2>&1; then
  phase "container image (release build)" container_image
fi
# Every test binary's tests, two at a time across binaries (cargo-nextest, .config/nextest.toml),
# then the doc tests, which nextest does not run. Without cargo-nextest: `cargo test`.
if cargo nextest --version >/dev/null 2>&1; then
  phase "tests (cargo nextest run --workspace)" cargo nextest run --workspace
  phase "doc tests" cargo test --workspace --doc
else
  echo "cargo-nextest is not installed: running the tests with cargo test (binaries one at a time)"
  phase "cargo test --workspace" cargo test --workspace
fi
# Every fuzz target for a bounded time on the stable toolchain (`--sanitizer none`; see
# scripts/fuzz.sh). The first run installs cargo-fuzz and builds the targets (~4 min here).
phase "fuzz (stable, ${EXACTLY_FUZZ_SECONDS:-20} s per target)" env EXACTLY_FUZZ_STABLE=1 bash scripts/fuzz.sh "${EXACTLY_FUZZ_SECONDS:-20}"
