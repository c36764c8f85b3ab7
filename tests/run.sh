#!/usr/bin/env bash
# Runs every flashgate test on this machine: installs what is missing (once),
# builds the binaries the end-to-end tests start, then runs the whole
# workspace's tests. Safe to run again; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashgate-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

apt_missing=()
# chromium (the dashboard test) and promtool (the alert rules check) too.
for tool in redis-server:redis-server nginx:nginx wrk:wrk chromium:chromium promtool:prometheus; do
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

# RocketMQ name server + broker for the order core's tests: a long compile
# (25-30 min on 2 cores), so installed once into ~/.cache/rocketmq and
# reused; skipped when both binaries are there at 1.0.0.
RMQ_ROOT="$HOME/.cache/rocketmq"
rmq_ok() {
    for b in rocketmq-namesrv-rust rocketmq-broker-rust; do
        local p
        p="$(command -v "$b" 2>/dev/null || echo "$RMQ_ROOT/bin/$b")"
        [ -x "$p" ] && "$p" --version 2>/dev/null | grep -qx 'version=1.0.0' || return 1
    done
}
# A machine of this project's kind may carry both binaries prebuilt beside
# the clone (../shared/rocketmq, with a checksum): unpacked, they save the
# compile. A user's machine has no such folder and compiles them.
RMQ_PREBUILT="$(cd .. && pwd)/shared/rocketmq"
if ! rmq_ok && [ -f "$RMQ_PREBUILT/rocketmq-1.0.0-bin.tar.xz" ] \
    && (cd "$RMQ_PREBUILT" && sha256sum -c --quiet SHA256SUMS) >/dev/null 2>&1; then
    echo "== unpacking prebuilt RocketMQ 1.0.0 into $RMQ_ROOT/bin"
    mkdir -p "$RMQ_ROOT/bin"
    tar -xJf "$RMQ_PREBUILT/rocketmq-1.0.0-bin.tar.xz" -C "$RMQ_ROOT/bin"
fi
if ! rmq_ok; then
    echo "== installing RocketMQ 1.0.0 into $RMQ_ROOT (slow, once)"
    cargo install --locked --root "$RMQ_ROOT" rocketmq-namesrv@1.0.0 rocketmq-broker@1.0.0
fi
export PATH="$PATH:$RMQ_ROOT/bin"

echo "== building (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --bins --locked
echo "== testing"
cargo test --workspace --locked --no-fail-fast
