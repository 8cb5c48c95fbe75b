#!/usr/bin/env bash
# Fuzzes each target in turn for SECONDS (default 900) at the lowest priority, one fuzzer
# process at a time, keeping the corpora in fuzz/corpus/<target> and logs in fuzz/logs.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
# Debug assertions on: overflow checks turn silent wrap-arounds into findings.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/tmp/tgt-fuzz-a}
secs=${1:-900}
shift || true
targets=("$@")
# shellcheck source=fuzz/targets.sh disable=SC1091
. ./targets.sh
[ ${#targets[@]} -gt 0 ] || targets=("${FUZZ_TARGETS[@]}")
mkdir -p logs
for t in "${targets[@]}"; do
    fuzz_seeds "$t"
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s ($(date -u +%H:%M:%S))"
    # `time` reports the CPU the fuzzer really got (the machine is shared; the limit is wall time).
    TIMEFORMAT="$t: %R s wall, %U s user, %S s sys"
    { time nice -n 19 cargo +nightly fuzz run -O -a "$t" "corpus/$t" "$seeds" -- \
        -max_total_time="$secs" -max_len="$len" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/$t-$(date -u +%H%M%S).log" 2>&1 || { echo "$t: FAILED (see fuzz/logs)"; exit 1; } ; } 2>>logs/cpu.txt
done
