#!/usr/bin/env bash
# Builds the proxy-wasm Rust SDK's examples (vendored here, see README.md)
# in release for wasm32-wasip1.
# Output: wasm-plugins/conformance/rust-sdk/target/wasm32-wasip1/release/<crate>.wasm
set -euo pipefail
cd "$(dirname "$0")"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "build.sh: the wasm32-wasip1 target is missing: rustup target add wasm32-wasip1" >&2
    exit 1
fi
# Our own target dir, whatever the caller's environment says.
export CARGO_TARGET_DIR="$PWD/target"
cargo build --release --locked --target wasm32-wasip1 "$@"
ls -1 target/wasm32-wasip1/release/*.wasm
