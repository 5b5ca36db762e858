#!/usr/bin/env bash
# test.sh — the whole test suite: set up the machine (services, runtime, models), then
# run every test of the workspace against the real services and the real model.
# Tests that spawn processes or load the model serialise themselves; see README.
# The recognizer's failpoints are compiled in (asr/failpoints): tests/failover.rs
# stops recognizer processes at them. They stay inert unless FAILPOINTS arms them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/deploy/setup.sh"
cd "$root"
cargo test --workspace --all-targets --features asr/failpoints "$@"
