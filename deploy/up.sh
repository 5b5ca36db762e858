#!/usr/bin/env bash
# up.sh — quick start: set up the machine, build, and run the whole system (`asr up`).
# Extra arguments go to `asr up` (see `asr up --help`). Ctrl-C stops everything.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/deploy/setup.sh"
cd "$root"
cargo build --release --bin asr
exec "$root/target/release/asr" up "$@"
