#!/usr/bin/env bash
# Runs each cargo-fuzz target (crates/exactly-fuzz) for SECONDS (default 60) on a nightly
# toolchain, installing cargo-fuzz from crates.io if it is missing. libFuzzer needs nightly
# (sanitizer flags), so this is not part of `.ci/run` (stable only); crashes are saved under
# crates/exactly-fuzz/artifacts/<target>/ and reproduce with
#   cargo +nightly fuzz run --fuzz-dir crates/exactly-fuzz <target> <artifact file>
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: apply snapshot submit config authorization)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then targets=(apply snapshot submit config authorization); fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
for t in "${targets[@]}"; do
  echo "== fuzz target $t for ${secs}s"
  start=$(date +%s)
  cargo +nightly fuzz run --fuzz-dir crates/exactly-fuzz "$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==[0-9]+==|SUMMARY|Done|thread '|panicked)" | tail -12
  echo "== $t: $(( $(date +%s) - start ))s"
done
