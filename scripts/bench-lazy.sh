#!/usr/bin/env bash
# The lazy-pull benchmark (issue 5): how soon a container of a freshly pulled image prints its first output, lazily
# (our snapshotter + dedupd, EROFS-native layers made by convert-image) against a full pull with containerd's
# overlayfs snapshotter, the same image behind the same throttled loopback registry, in one run.
#
#   sudo scripts/bench-lazy.sh [--rate BYTES_PER_SEC] [--chunk-size SIZE]
#
# Image: scripts/build-python-image.sh (Debian bookworm minbase + python3, two tar+gzip layers, 68 MB compressed,
# 167 MB uncompressed), command `python3 -c 'print(42)'`.  Registry: docker-registry behind scripts' registry-proxy
# at --rate (default 20000000 = 20 MB/s; BENCH_RATE) for everything the pulls fetch.  The environment is
# scripts/e2e-env.sh's (one containerd 1.6, one registry, our daemon with --fetch-socket), plus dedupd.
# Modes, each from an empty store and a dropped page cache:
#   overlayfs   `ctr image pull --snapshotter overlayfs` of the source image, then `ctr run` of the command: the
#               first output comes after the whole image is downloaded and unpacked.
#   lazy        convert-image's output (`--layer-media-type oci`: containerd 1.6 passes snapshot labels only for
#               layer types it knows) pulled with CRI's labels (diffclient -cri-labels pull), then `ctr run`:
#               containerd downloads no layer; dedupd fetches what the start reads, verified, and the rest after.
#   lazy+list   the same after `record` wrote the files the start reads and `convert-image --prefetch` stored
#               them in the image: dedupd fetches them first, in one burst.  (Skipped when `record` is missing.)
# Measured per mode: seconds from the pull's start to the command's output; for the lazy modes the bytes dedupd had
# fetched at that moment (as a fraction of the image's EROFS blobs) and the time until every blob was fetched and
# verified.  Then read-all (every file read inside a container, scripts/lib/bench-env.sh's read_all) once fully
# local, cold (page cache dropped) and warm, lazy vs overlayfs.
# Report (stdout, and target/bench/lazy.json): first-output ratio overlayfs/lazy (target ≥ 5), fraction fetched
# before first output (target ≤ 0.10), read-all speed lazy vs overlayfs (target ≥ 0.9, time ratio ≤ 1.11).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "bench-lazy: $*" >&2; }
die() {
    log "$*"
    exit 1
}
RATE=${BENCH_RATE:-20000000}
CHUNK=${BENCH_CHUNK:-}
while (($#)); do
    case $1 in
    --rate) RATE=$2; shift 2 ;;
    --chunk-size) CHUNK=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
    esac
done
# shellcheck source=lib/bench-env.sh
. "$ROOT/scripts/lib/bench-env.sh"
bench_setup lazy.json
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
    cargo build --release -q -p fetch-daemon -p registry-proxy
fi
BIN=$ROOT/target/release/dedup-snapshotter
DEDUPD=$ROOT/target/release/dedupd
PROXY=$ROOT/target/release/registry-proxy
DIFFCLIENT=${DIFFCLIENT:-$ROOT/scripts/harness/diffclient.sh}
[[ -x $DEDUPD && -x $PROXY ]] || die "build dedupd and registry-proxy first"
[[ -f $DIFFCLIENT ]] || die "$DIFFCLIENT missing (CRI's pull with labels)"

ENV_DIR=$(mktemp -d /tmp/bench-lazy.XXXXXX)
DEDUPD_DIR=$(mktemp -d /tmp/bench-dedupd.XXXXXX)
DEDUPD_PID=
PROXY_PID=
stop_extra() {
    [[ -n $PROXY_PID ]] && kill "$PROXY_PID" 2>/dev/null || true
    if [[ -n $DEDUPD_PID ]]; then
        kill "$DEDUPD_PID" 2>/dev/null || true
        wait "$DEDUPD_PID" 2>/dev/null || true
    fi
    umount -l "$DEDUPD_DIR/fuse" 2>/dev/null || true
    rm -rf "$DEDUPD_DIR"
}
cleanup() {
    local rc=$?
    # Lazy layers read dedupd's files: the environment goes first.
    if [[ -f "$ENV_DIR/env" ]]; then "$ROOT/scripts/e2e-env.sh" stop "$ENV_DIR" >/dev/null 2>&1 || true; fi
    stop_extra
    (exit "$rc")
    bench_env_cleanup
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bench_timeit

log "starting the environment in $ENV_DIR"
"$ROOT/scripts/e2e-env.sh" start "$ENV_DIR" \
    "$BIN serve --root {root} --address {socket} --containerd {root}/../containerd.sock --fetch-socket $DEDUPD_DIR/dedupd.sock" \
    >"$ENV_DIR/start.log" 2>&1 || die "e2e-env.sh start: $(cat "$ENV_DIR/start.log")"
# shellcheck disable=SC1091
source "$ENV_DIR/env"
NS=bench
ctr_() { ctr -a "$E2E_CONTAINERD_SOCK" -n "$NS" "$@"; }
dc() { "$DIFFCLIENT" -address "$E2E_CONTAINERD_SOCK" -diff "$E2E_SNAPSHOTTER_SOCK" -snapshotter dedup -namespace "$NS" "$@"; }

"$PROXY" --listen 127.0.0.1:0 --upstream "$E2E_REGISTRY" --rate "$RATE" --port-file "$ENV_DIR/proxy.addr" \
    >/dev/null 2>"$ENV_DIR/logs/proxy.log" &
PROXY_PID=$!
for _ in $(seq 50); do [[ -s $ENV_DIR/proxy.addr ]] && break; sleep 0.1; done
P=$(cat "$ENV_DIR/proxy.addr")
METRICS=127.0.0.1:$((20000 + RANDOM % 20000))
start_dedupd() { # [DEDUPD ARGS...]
    "$DEDUPD" --root "$DEDUPD_DIR/cache" --mountpoint "$DEDUPD_DIR/fuse" --socket "$DEDUPD_DIR/dedupd.sock" \
        --metrics-address "$METRICS" "$@" >>"$ENV_DIR/logs/dedupd.log" 2>&1 &
    DEDUPD_PID=$!
    for _ in $(seq 100); do curl -sf "http://$METRICS/metrics" >/dev/null && return; sleep 0.1; done
    die "dedupd did not start: $(tail "$ENV_DIR/logs/dedupd.log")"
}
start_dedupd
restart_dedupd() { # [DEDUPD ARGS...]
    kill "$DEDUPD_PID"
    wait "$DEDUPD_PID" 2>/dev/null || true
    start_dedupd "$@"
}
metric_sum() { curl -sf "http://$METRICS/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d", s }'; }

log "pushing the python image to $E2E_REGISTRY"
"$ROOT/scripts/build-python-image.sh" push "$E2E_REGISTRY" python:latest >/dev/null
SRC=$E2E_REGISTRY/python:latest
convert() { # TAG [ARGS...]: prints the JSON report
    local tag=$1
    shift
    "$BIN" convert-image --json --layer-media-type oci ${CHUNK:+--chunk-size "$CHUNK"} "$@" "$SRC" "$E2E_REGISTRY/python:$tag"
}
convert lazy >"$ENV_DIR/convert.json"
IMAGE_BYTES=$(python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(open(sys.argv[1]))["layers"]))' "$ENV_DIR/convert.json")
CONVERT_S=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$ENV_DIR/convert.json")
log "converted in ${CONVERT_S}s: $IMAGE_BYTES bytes of EROFS blobs"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
empty_stores() {
    local imgs
    imgs=$(ctr_ image ls -q)
    if [[ -n $imgs ]]; then
        # shellcheck disable=SC2086
        ctr_ image rm --sync $imgs >/dev/null
    fi
    for _ in $(seq 100); do
        [[ -z "$(snapshots_of dedup)$(snapshots_of overlayfs)" ]] && break
        sleep 0.2
    done
}

CMD=(python3 -c 'print(42)')
declare -A R
first_output() { # MODE SNAPSHOTTER REF PULL...: sets R[MODE.first] (and fetched bytes)
    local mode=$1 snap=$2 ref=$3 t out
    shift 3
    empty_stores
    drop_caches
    curl -sf -X POST "http://$P/_proxy/reset-stats" >/dev/null
    local fetched0
    fetched0=$(metric_sum dedupd_fetched_bytes_total)
    t=$(now)
    "$@" >/dev/null
    R[$mode.pull]=$(since "$t")
    out=$(ctr_ run --rm --snapshotter "$snap" "$ref" "first-$mode" "${CMD[@]}")
    R[$mode.first]=$(since "$t")
    [[ $out == 42 ]] || die "$mode: the command printed '$out'"
    R[$mode.fetched]=$(($(metric_sum dedupd_fetched_bytes_total) - fetched0))
    R[$mode.registry_bytes]=$(curl -sf "http://$P/_proxy/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["blob_bytes"])')
    log "$mode: pull ${R[$mode.pull]}s, first output ${R[$mode.first]}s, dedupd fetched ${R[$mode.fetched]} bytes, registry served ${R[$mode.registry_bytes]} blob bytes"
}
wait_complete() { # MODE
    local t=$1
    for _ in $(seq 1200); do
        local size present
        size=$(metric_sum dedupd_blob_size_bytes)
        present=$(metric_sum dedupd_blob_present_bytes)
        if ((size > 0 && present >= size)); then
            # Verified: dedupd hashes the whole blob once complete.
            python3 - "$DEDUPD_DIR/dedupd.sock" <<'PY' && return
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"op":"list"}\n')
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
blobs = json.loads(data)
blobs = blobs.get("ok", blobs) if isinstance(blobs, dict) else blobs
sys.exit(0 if blobs and all(b["verified"] for b in blobs) else 1)
PY
        fi
        sleep 0.1
    done
    die "the lazy blobs were not fetched within 120 s"
}

# 1. overlayfs, full pull through the throttled registry.
first_output overlayfs overlayfs "$P/python:latest" ctr_ image pull --plain-http --snapshotter overlayfs "$P/python:latest"
R[overlayfs.read_cold]=$(drop_caches; read_all overlayfs "$P/python:latest" ra-ovl-cold)
R[overlayfs.read_warm]=$(read_all overlayfs "$P/python:latest" ra-ovl-warm)

# 2. lazy, no prefetch list.
first_output lazy dedup "$P/python:lazy" dc -cri-labels pull "$P/python:lazy"
t=$(now)
wait_complete lazy
R[lazy.complete]=$(awk -v a="${R[lazy.first]}" -v b="$(since "$t")" 'BEGIN { printf "%.4f", a + b }')
R[lazy.read_cold]=$(drop_caches; read_all dedup "$P/python:lazy" ra-lazy-cold)
R[lazy.read_warm]=$(read_all dedup "$P/python:lazy" ra-lazy-warm)

# 3. lazy with the start's files recorded and stored as the prefetch list.
MODES="overlayfs lazy"
if "$BIN" record --help >/dev/null 2>&1; then
    # Record on the lazily pulled image (files the start reads), then convert again with the list.
    empty_stores
    # Without background prefetch while recording: on the fanotify data path a blob completed (and unmarked)
    # before the start reads it raises no events, and the list would miss what it read.
    restart_dedupd --no-prefetch
    dc -cri-labels pull "$P/python:lazy" >/dev/null
    "$BIN" record --fetch-socket "$DEDUPD_DIR/dedupd.sock" --containerd "$E2E_CONTAINERD_SOCK" --namespace "$NS" \
        --output "$ENV_DIR/prefetch.txt" "$P/python:lazy" -- "${CMD[@]}" 2>>"$ENV_DIR/logs/record.log"
    # One line per range (PATH<TAB>START+LEN): the files are the distinct paths.
    log "recorded $(wc -l <"$ENV_DIR/prefetch.txt") ranges of $(cut -f1 "$ENV_DIR/prefetch.txt" | sort -u | wc -l) files the start reads"
    empty_stores
    restart_dedupd
    convert list --prefetch "$ENV_DIR/prefetch.txt" >"$ENV_DIR/convert-list.json"
    first_output lazy_list dedup "$P/python:list" dc -cri-labels pull "$P/python:list"
    MODES="$MODES lazy_list"
else
    log "no \`record\` command: the lazy+list mode is skipped"
fi
empty_stores

python3 - "$RAW" "$IMAGE_BYTES" "$RATE" "$CONVERT_S" "$MODES" <<PY
import json, sys
raw, image_bytes, rate, convert_s, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5].split()
r = {}
$(for k in "${!R[@]}"; do printf 'r["%s"] = float("%s")\n' "$k" "${R[$k]}"; done)
out = {"rate_bytes_per_s": rate, "image_bytes": image_bytes, "convert_seconds": convert_s, "modes": {}}
for m in modes:
    out["modes"][m] = {k.split(".", 1)[1]: v for k, v in r.items() if k.split(".", 1)[0] == m}
o = out["modes"]["overlayfs"]
summary = {}
for m in modes[1:]:
    x = out["modes"][m]
    summary[m] = {
        "first_output_s": x["first"],
        "first_output_speedup_vs_overlayfs": o["first"] / x["first"],
        "fetched_fraction_at_first_output": x["fetched"] / image_bytes,
    }
lz = out["modes"]["lazy"]
summary["read_all_time_ratio_lazy_over_overlayfs"] = {
    "cold": lz["read_cold"] / o["read_cold"], "warm": lz["read_warm"] / o["read_warm"]}
out["summary"] = summary
json.dump(out, open(raw, "w"), indent=2)
print(json.dumps(out, indent=2))
print(f"overlayfs: first output {o['first']:.2f} s (pull {o['pull']:.2f} s)")
for m in modes[1:]:
    s = summary[m]
    print(f"{m}: first output {s['first_output_s']:.2f} s = {s['first_output_speedup_vs_overlayfs']:.1f}x sooner "
          f"(target >= 5), {100*s['fetched_fraction_at_first_output']:.1f}% of the image fetched then (target <= 10%)")
ra = summary["read_all_time_ratio_lazy_over_overlayfs"]
print(f"read-all once local, time lazy/overlayfs: cold {ra['cold']:.2f}, warm {ra['warm']:.2f} (target <= 1.11)")
PY
