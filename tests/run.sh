#!/usr/bin/env bash
# Runs every flashgate test on this machine: installs what is missing (once),
# builds the binaries the end-to-end tests start, then runs the whole
# workspace's tests. Safe to run again; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashgate-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

apt_missing=()
for tool in redis-server:redis-server nginx:nginx wrk:wrk; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || apt_missing+=("${tool##*:}")
done
if [ ${#apt_missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "== installing ${apt_missing[*]} (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
    else
        echo "== note: ${apt_missing[*]} missing and not root; benchmarks need them" >&2
    fi
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    echo "== adding the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
fi

echo "== building (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --bins --locked
echo "== testing"
cargo test --workspace --locked
