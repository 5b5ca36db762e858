#!/usr/bin/env bash
# setup.sh — everything the system and its tests need on this machine, idempotently:
# RabbitMQ (streams), Redis and PostgreSQL installed and running (services.sh), and the
# recognizer's runtime and models in .runtime/ plus .cargo/config.toml (runtime.sh).
# After it, plain `cargo build` and `cargo test` work with nothing exported.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/services.sh"
bash "$here/runtime.sh"
