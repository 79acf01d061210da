#!/usr/bin/env bash
# Verifies everything without editing files: formatting, lints, and every test.
# Slow suites are bounded in time; EXACTLY_LONG=1 runs longer sweeps where tests offer them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
