#!/usr/bin/env bash
# The lazy-pull benchmark (issues 5 and 16): how soon a container of a freshly pulled image prints its first output,
# lazily (our snapshotter + dedupd, EROFS-native layers made by convert-image) against a full pull with containerd's
# overlayfs snapshotter and with our own snapshotter, the same image behind the same throttled loopback registry, in
# one run, at each rate.
#
#   sudo scripts/bench-lazy.sh [--rates "BYTES_PER_SEC ..."] [--chunk-size SIZE]
#
# Image: scripts/build-python-image.sh (Debian bookworm minbase + python3, two tar+gzip layers, 68 MB compressed,
# 167 MB uncompressed), command `python3 -c 'print(42)'`.  Registry: docker-registry behind registry-proxy at each
# rate (default "20000000 5000000" = 20 and 5 MB/s; BENCH_RATES) for everything the pulls fetch.  The environment
# is scripts/e2e-env.sh's (one containerd 1.6, one registry, our daemon with --fetch-socket), plus dedupd with its
# default data path (fanotify where the kernel has it, else FUSE; printed).
# Conversions (once): uncompressed chunks (`lazy`), zstd chunks (`--chunk-compression zstd`, `lazy_zstd`), and zstd
# chunks with the block ranges `record` saw the start read as the prefetch list (`lazy_zstd_list`; recorded once,
# unthrottled, on a dedupd without background prefetch).
# Modes, each from an empty store and a dropped page cache, at each rate:
#   overlayfs   `ctr image pull --snapshotter overlayfs` of the source image, then `ctr run`.
#   dedup_full  the same with our snapshotter (containerd 1.6 unpacks, our Commit converts): our non-lazy layers.
#   lazy*       the conversion pulled with CRI's labels (diffclient -cri-labels pull), then `ctr run`: containerd
#               downloads no layer; dedupd fetches what the start reads, verified, and the rest after.
#   index       (issue 17) the unmodified gzip image, with the artifact `index-image` pushed for it (chunks of
#               INDEX_CHUNK, default index-image's 1M), pulled the same way: the snapshotter mounts each layer's metadata from the
#               artifact and dedupd serves the uncompressed tar from Range requests on the original gzip blobs.
# Measured per mode: seconds from the pull's start to the command's output; for the lazy modes the bytes dedupd had
# fetched by then, and the time until every blob was fetched and verified.  At the first rate, read-all (every file
# read inside a container, scripts/lib/bench-env.sh's read_all; the median of BENCH_READ_REPS=3) cold and warm:
# overlayfs, dedup_full, and the last lazy mode once fully local.
# Report (stdout, and target/bench/lazy.json), with issue 16's targets: first output >= 8x sooner than overlayfs;
# fetched by then <= 5% of the uncompressed image and <= 10% of the gzip source; registry storage <= 1.2x the gzip
# source; read-all once local <= 1.0x our non-lazy layers.  For `index`, issue 17's: first output >= 4x sooner,
# artifacts <= 5% of the gzip image, read-all once local >= 0.9x the speed of our non-lazy layers.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "bench-lazy: $*" >&2; }
die() {
    log "$*"
    exit 1
}
RATES=${BENCH_RATES:-${BENCH_RATE:-20000000 5000000}}
CHUNK=${BENCH_CHUNK:-}
while (($#)); do
    case $1 in
    --rate) RATES=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
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

"$PROXY" --listen 127.0.0.1:0 --upstream "$E2E_REGISTRY" --rate "${RATES%% *}" --port-file "$ENV_DIR/proxy.addr" \
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
sum_field() { python3 -c 'import json,sys; print(sum(l.get(sys.argv[2], l["size"]) for l in json.load(open(sys.argv[1]))["layers"]))' "$@"; }
convert lazy >"$ENV_DIR/convert.json"
convert zstd --chunk-compression zstd >"$ENV_DIR/convert-zstd.json"
IMAGE_BYTES=$(sum_field "$ENV_DIR/convert.json" size)
SOURCE_BYTES=$(sum_field "$ENV_DIR/convert.json" source_size)
STORED_ZSTD=$(sum_field "$ENV_DIR/convert-zstd.json" size)
CONVERT_S=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$ENV_DIR/convert.json")
log "converted in ${CONVERT_S}s: $IMAGE_BYTES bytes of EROFS blobs; $STORED_ZSTD with zstd chunks; gzip source $SOURCE_BYTES"
# The unmodified gzip image plus its tar index (issue 17): an artifact that refers to python:latest's manifest.
"$BIN" index-image --json ${INDEX_CHUNK:+--chunk-size "$INDEX_CHUNK"} "$SRC" >"$ENV_DIR/index.json"
INDEX_BYTES=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["artifact_bytes"])' "$ENV_DIR/index.json")
INDEX_S=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$ENV_DIR/index.json")
log "indexed in ${INDEX_S}s: artifact of $INDEX_BYTES bytes"

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
# The median of READ_REPS read-alls (default 3: a single cold read-all moves by about 20% between runs), cold (the
# page cache dropped before each) or warm.
READ_REPS=${BENCH_READ_REPS:-3}
read_median() { # cold|warm SNAPSHOTTER REF ID
    local how=$1 i t=()
    shift
    for ((i = 0; i < READ_REPS; i++)); do
        [[ $how == cold ]] && drop_caches
        t+=("$(read_all "$1" "$2" "$3-$i")")
    done
    printf '%s\n' "${t[@]}" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
set_rate() { curl -sf -X POST "http://$P/_proxy/config?rate=$1" >/dev/null || die "cannot set the proxy's rate"; }

CMD=(python3 -c 'print(42)')
declare -A R
first_output() { # KEY SNAPSHOTTER REF PULL...: sets R[KEY.first] (and fetched bytes); KEY is RATE/MODE
    local key=$1 snap=$2 ref=$3 t out
    shift 3
    empty_stores
    drop_caches
    curl -sf -X POST "http://$P/_proxy/reset-stats" >/dev/null
    local fetched0
    fetched0=$(metric_sum dedupd_fetched_bytes_total)
    t=$(now)
    "$@" >/dev/null
    R[$key.pull]=$(since "$t")
    out=$(ctr_ run --rm --snapshotter "$snap" "$ref" "first-${key//\//-}" "${CMD[@]}")
    R[$key.first]=$(since "$t")
    [[ $out == 42 ]] || die "$key: the command printed '$out'"
    R[$key.fetched]=$(($(metric_sum dedupd_fetched_bytes_total) - fetched0))
    R[$key.registry_bytes]=$(curl -sf "http://$P/_proxy/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["blob_bytes"])')
    T0=$t
    log "$key: pull ${R[$key.pull]}s, first output ${R[$key.first]}s, dedupd fetched ${R[$key.fetched]} bytes, registry served ${R[$key.registry_bytes]} blob bytes"
}
wait_complete() { # KEY: sets R[KEY.complete], seconds from the pull's start until every blob is fetched and verified
    local key=$1
    for _ in $(seq 3000); do
        local size present
        size=$(metric_sum dedupd_blob_size_bytes)
        present=$(metric_sum dedupd_blob_present_bytes)
        if ((size > 0 && present >= size)); then
            # Verified: dedupd hashes the whole blob once complete.
            if python3 - "$DEDUPD_DIR/dedupd.sock" <<'PY'; then
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
                R[$key.complete]=$(since "$T0")
                return
            fi
        fi
        sleep 0.1
    done
    die "$key: the lazy blobs were not fetched within 300 s"
}

DATA_PATH=$(curl -sf "http://$METRICS/metrics" | sed -n 's/^dedupd_data_path{path="\([a-z]*\)"} 1$/\1/p')
log "dedupd's data path: ${DATA_PATH:-unknown}"

# The start's reads, recorded once on the lazily pulled image and stored as the prefetch list of a third conversion.
LIST=
if "$BIN" record --help >/dev/null 2>&1; then
    set_rate 0
    empty_stores
    # Without background prefetch while recording: on the fanotify data path a blob completed (and unmarked)
    # before the start reads it raises no events, and the list would miss what it read.
    restart_dedupd --no-prefetch
    dc -cri-labels pull "$P/python:zstd" >/dev/null
    "$BIN" record --fetch-socket "$DEDUPD_DIR/dedupd.sock" --containerd "$E2E_CONTAINERD_SOCK" --namespace "$NS" \
        --output "$ENV_DIR/prefetch.txt" "$P/python:zstd" -- "${CMD[@]}" 2>>"$ENV_DIR/logs/record.log"
    # One line per range (PATH<TAB>START+LEN): the files are the distinct paths.
    log "recorded $(wc -l <"$ENV_DIR/prefetch.txt") ranges of $(cut -f1 "$ENV_DIR/prefetch.txt" | sort -u | wc -l) files the start reads"
    empty_stores
    restart_dedupd
    convert zstd-list --chunk-compression zstd --prefetch "$ENV_DIR/prefetch.txt" >"$ENV_DIR/convert-list.json"
    LIST=lazy_zstd_list
else
    log "no \`record\` command: the list mode is skipped"
fi

FIRST_RATE=${RATES%% *}
for rate in $RATES; do
    set_rate "$rate"
    # Full pulls: containerd's overlayfs, and our snapshotter's own non-lazy path (the read-all baseline).
    first_output "$rate/overlayfs" overlayfs "$P/python:latest" ctr_ image pull --plain-http --snapshotter overlayfs "$P/python:latest"
    if [[ $rate == "$FIRST_RATE" ]]; then
        R[read.overlayfs_cold]=$(read_median cold overlayfs "$P/python:latest" ra-ovl-cold)
        R[read.overlayfs_warm]=$(read_median warm overlayfs "$P/python:latest" ra-ovl-warm)
    fi
    first_output "$rate/dedup_full" dedup "$P/python:latest" ctr_ image pull --plain-http --snapshotter dedup "$P/python:latest"
    if [[ $rate == "$FIRST_RATE" ]]; then
        R[read.dedup_cold]=$(read_median cold dedup "$P/python:latest" ra-dedup-cold)
        R[read.dedup_warm]=$(read_median warm dedup "$P/python:latest" ra-dedup-warm)
    fi
    # Lazy: uncompressed chunks, zstd chunks, zstd chunks with the recorded list.
    for mode in lazy lazy_zstd $LIST index; do
        case $mode in
        lazy) tag=lazy ;;
        lazy_zstd) tag=zstd ;;
        lazy_zstd_list) tag=zstd-list ;;
        index) tag=latest ;;
        esac
        first_output "$rate/$mode" dedup "$P/python:$tag" dc -cri-labels pull "$P/python:$tag"
        wait_complete "$rate/$mode"
        if [[ $rate == "$FIRST_RATE" && $mode == "${LIST:-lazy_zstd}" ]]; then
            R[read.lazy_cold]=$(read_median cold dedup "$P/python:$tag" ra-lazy-cold)
            R[read.lazy_warm]=$(read_median warm dedup "$P/python:$tag" ra-lazy-warm)
        fi
        if [[ $rate == "$FIRST_RATE" && $mode == index ]]; then
            R[read.index_cold]=$(read_median cold dedup "$P/python:$tag" ra-index-cold)
            R[read.index_warm]=$(read_median warm dedup "$P/python:$tag" ra-index-warm)
        fi
    done
done
empty_stores

python3 - "$RAW" "$IMAGE_BYTES" "$SOURCE_BYTES" "$STORED_ZSTD" "$CONVERT_S" "$RATES" "${DATA_PATH:-unknown}" "${LIST:-lazy_zstd}" "$INDEX_BYTES" "$INDEX_S" <<PY
import json, sys
raw = sys.argv[1]
image_bytes, source_bytes, stored_zstd = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
convert_s, rates, data_path, read_mode = float(sys.argv[5]), sys.argv[6].split(), sys.argv[7], sys.argv[8]
index_bytes, index_s = int(sys.argv[9]), float(sys.argv[10])
r = {}
$(for k in "${!R[@]}"; do printf 'r["%s"] = float("%s")\n' "$k" "${R[$k]}"; done)
out = {"data_path": data_path, "image_bytes": image_bytes, "gzip_source_bytes": source_bytes,
       "stored_bytes": {"lazy": image_bytes, "lazy_zstd": stored_zstd}, "convert_seconds": convert_s,
       "index_artifact_bytes": index_bytes, "index_seconds": index_s, "rates": {}}
for rate in rates:
    modes = {}
    for k, v in r.items():
        if k.startswith(rate + "/"):
            mode, metric = k[len(rate) + 1:].split(".", 1)
            modes.setdefault(mode, {})[metric] = v
    out["rates"][rate] = modes
out["read_all"] = {k.split(".", 1)[1]: v for k, v in r.items() if k.startswith("read.")}
json.dump(out, open(raw, "w"), indent=2)
print(json.dumps(out, indent=2))
print(f"data path: {data_path}")
print(f"registry storage: uncompressed chunks {image_bytes/1e6:.1f} MB = {image_bytes/source_bytes:.2f}x the gzip source "
      f"({source_bytes/1e6:.1f} MB); zstd chunks {stored_zstd/1e6:.1f} MB = {stored_zstd/source_bytes:.2f}x (target <= 1.2)")
for rate in rates:
    m = out["rates"][rate]
    o = m["overlayfs"]
    print(f"at {int(rate)/1e6:g} MB/s: overlayfs first output {o['first']:.2f} s (pull {o['pull']:.2f} s); "
          f"dedup (full pull) {m['dedup_full']['first']:.2f} s")
    for mode in ("lazy", "lazy_zstd", "lazy_zstd_list"):
        if mode not in m:
            continue
        x = m[mode]
        print(f"  {mode}: first output {x['first']:.2f} s = {o['first']/x['first']:.1f}x sooner (target >= 8); "
              f"fetched by then {x['fetched']/1e6:.2f} MB = {100*x['fetched']/image_bytes:.1f}% of the uncompressed image "
              f"(target <= 5%), {100*x['fetched']/source_bytes:.1f}% of the gzip source (target <= 10%); "
              f"all fetched and verified after {x['complete']:.1f} s")
    if "index" in m:
        x = m["index"]
        print(f"  index: first output {x['first']:.2f} s = {o['first']/x['first']:.1f}x sooner (target >= 4); "
              f"fetched by then {x['fetched']/1e6:.2f} MB = {100*x['fetched']/source_bytes:.1f}% of the gzip image; "
              f"all fetched and verified after {x['complete']:.1f} s")
print(f"index artifacts: {index_bytes} bytes = {100*index_bytes/source_bytes:.2f}% of the gzip image (target <= 5%), "
      f"made in {index_s:.1f} s; nothing else pushed")
ra = out["read_all"]
print(f"read-all once local ({read_mode}), time over our non-lazy layers: cold {ra['lazy_cold']/ra['dedup_cold']:.2f}, "
      f"warm {ra['lazy_warm']/ra['dedup_warm']:.2f} (target <= 1.0); over overlayfs: cold "
      f"{ra['lazy_cold']/ra['overlayfs_cold']:.2f}, warm {ra['lazy_warm']/ra['overlayfs_warm']:.2f}")
if "index_cold" in ra:
    print(f"read-all once local (index), time over our non-lazy layers: cold {ra['index_cold']/ra['dedup_cold']:.2f}, "
          f"warm {ra['index_warm']/ra['dedup_warm']:.2f} (target <= 1.11, i.e. >= 0.9x their speed)")
PY
