#!/usr/bin/env bash
# A short fuzzing run for CI: every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default
# 30) from the committed seed corpora, on the default (stable) toolchain. Exits non-zero
# on the first crash, leak, timeout or failed build; the crashing input is kept in
# fuzz/artifacts/<target>/ and printed.
#
#   scripts/fuzz-smoke.sh                  # all targets, 30 s each
#   FUZZ_SECONDS=5 scripts/fuzz-smoke.sh tar_convert
#
# Stable Rust cannot build sanitizers, so the targets build with `--sanitizer none`
# (our code is safe Rust; the fuzzer's coverage instrumentation is a stable codegen
# option) and with debug assertions, which make integer overflow a finding. The long
# runs (fuzz/run.sh, nightly with AddressSanitizer) are described in fuzz/README.md.
# Needs cargo-fuzz (installed here when missing) and a C++ compiler for libFuzzer.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
secs=${FUZZ_SECONDS:-30}
targets=("$@")
# shellcheck source=fuzz/targets.sh
. "$ROOT/fuzz/targets.sh"
[ ${#targets[@]} -gt 0 ] || targets=("${FUZZ_TARGETS[@]}")
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz-smoke: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
# Its own target dir: the instrumented build shares nothing with the workspace's.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}
cd "$ROOT/fuzz"
flags=(--sanitizer none --debug-assertions)
start=$(date +%s)
nice -n 10 cargo fuzz build "${flags[@]}"
echo "fuzz-smoke: built in $(($(date +%s) - start))s" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    fuzz_seeds "$t"
    mkdir -p "$work/$t"
    log="$work/$t.log"
    if ! nice -n 10 cargo fuzz run "${flags[@]}" "$t" "$work/$t" "$seeds" -- \
        -max_total_time="$secs" -max_len="$len" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz-smoke: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    echo "fuzz-smoke: $t ok ($(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1))" >&2
done
echo "fuzz-smoke: all targets ok in $(($(date +%s) - start))s" >&2
