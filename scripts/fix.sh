#!/usr/bin/env bash
# Fixes what can be fixed mechanically: formatting and machine-applicable lint suggestions.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo clippy --workspace --all-targets --fix --allow-dirty --allow-staged -- -D warnings || true
cargo fmt --all
