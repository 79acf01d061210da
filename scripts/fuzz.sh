#!/usr/bin/env bash
# Runs each cargo-fuzz target (crates/exactly-fuzz) for SECONDS (default 60), installing
# cargo-fuzz from crates.io if it is missing. With a nightly toolchain the targets are built
# with AddressSanitizer; without one (or with EXACTLY_FUZZ_STABLE=1, as scripts/test.sh runs it
# in CI) on the stable toolchain with `--sanitizer none`: libFuzzer's coverage-guided search
# still runs and panics (failed asserts, invariant checks, overflow checks) are still found,
# memory errors only in the unsafe code of dependencies go unseen. Exits non-zero if a target
# found a crash; crashes are saved under crates/exactly-fuzz/artifacts/<target>/ and reproduce
# with
#   cargo fuzz run --fuzz-dir crates/exactly-fuzz [--sanitizer none] <target> <artifact file>
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (targets: apply snapshot submit config authorization)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then targets=(apply snapshot submit config authorization); fi
if [[ -z ${EXACTLY_FUZZ_STABLE:-} ]] && rustup run nightly rustc --version >/dev/null 2>&1; then
  run=(cargo +nightly fuzz run)
else
  run=(cargo fuzz run --sanitizer none)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
echo "== fuzzing with: ${run[*]}"
failed=()
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  echo "== fuzz target $t for ${secs}s"
  start=$(date +%s)
  status=0
  # The target's corpus, then the inputs it once crashed on (kept in git; replayed on stable by
  # crates/exactly-core/tests/fuzz_regressions.rs too), as seeds.
  corpus=("crates/exactly-fuzz/corpus/$t")
  mkdir -p "${corpus[0]}"
  if [[ -d crates/exactly-fuzz/regressions/$t ]]; then corpus+=("crates/exactly-fuzz/regressions/$t"); fi
  "${run[@]}" --fuzz-dir crates/exactly-fuzz "$t" "${corpus[@]}" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^(#[0-9]+.*(DONE|pulse)|stat::|==[0-9]+==|SUMMARY|Done|thread '|panicked|error)" "$log" | tail -12 || true
  if [[ $status -ne 0 ]]; then
    failed+=("$t")
    tail -40 "$log"
  fi
  echo "== $t: $(( $(date +%s) - start ))s, exit $status"
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz targets that failed: ${failed[*]}" >&2
  exit 1
fi
