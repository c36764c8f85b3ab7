#!/usr/bin/env bash
# Builds every guest filter in release for wasm32-wasip1.
# Output: wasm-plugins/target/wasm32-wasip1/release/<crate_name>.wasm
# Usage: wasm-plugins/build.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "build.sh: the wasm32-wasip1 target is missing: rustup target add wasm32-wasip1" >&2
    exit 1
fi
# Our own target dir, whatever the caller's environment says: the main
# workspace's CARGO_TARGET_DIR must not receive guest builds.
export CARGO_TARGET_DIR="$PWD/target"
cargo build --release --target wasm32-wasip1 "$@"
ls -1 target/wasm32-wasip1/release/*.wasm
