#!/usr/bin/env bash
# Builds assembly/index.ts with the AssemblyScript proxy-wasm SDK
# (@solo-io/proxy-runtime 0.1.8) and the assemblyscript compiler it pins
# (0.14.9), both from npm, as the SDK's README says (`--use
# abort=abort_proc_exit`, optimized).
# Output: wasm-plugins/conformance/assemblyscript/build/add_header.wasm
# node_modules live outside the clone, in $FLASHGATE_NPM_CACHE (default
# ~/.cache/flashgate-npm), keyed by the lock file, so a rebuild installs
# nothing. Exits 3 when npm is not installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "build.sh: node/npm not found; the AssemblyScript filter is not built" >&2
    exit 3
fi
key="$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)"
work="${FLASHGATE_NPM_CACHE:-$HOME/.cache/flashgate-npm}/assemblyscript-$key"
mkdir -p "$work"
if [ ! -x "$work/node_modules/.bin/asc" ]; then
    cp "$here/package.json" "$here/package-lock.json" "$work/"
    (cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
fi
rm -rf "$work/assembly"
cp -r "$here/assembly" "$work/assembly"
mkdir -p "$here/build"
(cd "$work" && node_modules/.bin/asc assembly/index.ts -b "$here/build/add_header.wasm" \
    --use abort=abort_proc_exit --optimize)
ls -1 "$here/build/add_header.wasm"
