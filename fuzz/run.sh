#!/usr/bin/env bash
# Bounded fuzzing of the gateway's parsers of untrusted bytes (fuzz/): each
# target runs FUZZ_SECONDS (default 20) from its seeds in fuzz/seeds/ (the
# config target also from config/*.toml) plus the corpus earlier runs on
# this machine grew (~/.cache/flashgate-fuzz/corpus). A crash fails the
# run and leaves its input in fuzz/artifacts/<target>/.
#
# Needs the nightly toolchain (fuzzing only; the workspace builds on
# stable) and cargo-fuzz, installed once into ~/.cache/flashgate-fuzz.
# Skips, saying so, only when nightly cannot be installed.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH="${FUZZ_SECONDS:-20}"
CACHE="$HOME/.cache/flashgate-fuzz"
TARGETS=(head_scan proxy_protocol config cache_entry path authority)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "== fuzz: installing the nightly toolchain (fuzzing only)"
    if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
        || ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "== fuzz: SKIPPED: the nightly toolchain cannot be installed here (cargo fuzz needs it)"
        exit 0
    fi
fi

CARGO_FUZZ_VERSION=0.13.2
export PATH="$CACHE/bin:$PATH"
if ! cargo-fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "== fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into $CACHE (once)"
    cargo install --locked --root "$CACHE" "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

# Kept between runs: the instrumented build (dependencies are built once)
# and the corpus.
TARGET_DIR="${FUZZ_TARGET_DIR:-$CACHE/target}"
echo "== fuzz: building ${#TARGETS[@]} targets (target dir $TARGET_DIR)"
cargo +nightly fuzz build --target-dir "$TARGET_DIR" --debug-assertions

failed=()
for t in "${TARGETS[@]}"; do
    corpus="$CACHE/corpus/$t"
    mkdir -p "$corpus"
    seeds=(seeds/"$t")
    [ "$t" = config ] && seeds=(../config)
    echo "== fuzz: $t for ${SECONDS_EACH}s"
    if ! cargo +nightly fuzz run --target-dir "$TARGET_DIR" --debug-assertions "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>"$CACHE/$t.log"; then
        tail -n 40 "$CACHE/$t.log"
        failed+=("$t")
    else
        grep -E '^(stat::number_of_executed_units|#[0-9]+ +DONE)' "$CACHE/$t.log" | tail -n 2 || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "== fuzz: ${#TARGETS[@]} targets ran ${SECONDS_EACH}s each, no crash"
