#!/usr/bin/env bash
# The compression benchmark: our converter (`dedup-snapshotter convert --compress ALGO[,LEVEL]`) against
# `mkfs.erofs 1.9.4 --tar=f --ungzip -zALGO[,level=LEVEL]` on the same input in the same run: the Debian bookworm
# minbase layer as tar.gz (crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh, ~93 MB gzip, ~200 MB tar).
#
#   sudo scripts/bench-compress.sh [-n REPS] [--pcluster-size BYTES] [ALGO[,LEVEL] ...]
#
# ALGOs (arguments, else BENCH_ALGOS, else "lz4 lz4hc zstd deflate"): lz4, lz4hc, zstd, deflate, each with an optional
# level; without one both tools use their defaults (lz4hc 9, zstd 3, deflate 1).  Our deflate is libdeflate, so it is
# compared with mkfs.erofs's `-zlibdeflate` (same on-disk algorithm).  --pcluster-size BYTES (or PCLUSTER=BYTES) is
# passed to both tools for the compressed rows (ours --pcluster-size, mkfs.erofs -C).
# The compressed rows pack tails after their inodes (ours by default, mkfs.erofs with -Eztailpacking); NO_INLINE=1
# makes them block-aligned instead (ours --no-inline, mkfs.erofs -Enoinline_data), as the snapshotter stores layers.
# Rows: for each ALGO, ours and mkfs.erofs; plus the uncompressed rows: ours by default (the baseline), ours
# --no-inline (block-aligned file data, how the snapshotter stores layers), mkfs.erofs by default and with
# -Enoinline_data.  For each repetition (the order ours/mkfs.erofs alternates between repetitions) and row:
#   convert   wall time of the conversion (and user+sys CPU time), tar.gz in, image out; `sync` before, untimed after
#             (neither tool fsyncs).  Both run at `nice -n 5`, with their default thread counts.
#   fsck      `fsck.erofs --extract IMG` (1.9.4, every file decompressed and checked) on every image; a failure is
#             reported with the command and its output, the image kept in BENCH_DIR, and the script exits 1 at the end.
#   size      the image's size (st_size) and its disk use (allocated blocks).
#   read_cold every regular file read (`find MNT -xdev -type f -exec cat {} + >/dev/null`) from a read-only
#             file-backed mount (mount(2) of the image file, no loop device, as the snapshotter mounts layers), after
#             `sync; echo 3 >/proc/sys/vm/drop_caches` and the mount; the mount is not timed.
#   read_warm the same right after, cache warm; then unmounted.
#   content   in the first repetition, each mounted tree's manifest (type, mode, owner, link count, path, symlink
#             targets, sha256 of every regular file) must equal mkfs.erofs's uncompressed image's (exit 1 otherwise).
# Report: medians over REPS (default 3, or BENCH_REPS); size ratios to mkfs.erofs with the same algorithm and to our
# uncompressed image, convert time ratio ours/mkfs.erofs, read-all ratios to our uncompressed image.  Targets (the
# issue; a miss is reported, not an error):
#   size      ours ≤ 1.03× mkfs.erofs's, same algorithm and level
#   convert   ours ≤ 1.0× mkfs.erofs's
#   read      lz4 read-all cold ≤ 1.0× our uncompressed image's
#   disk      lz4hc ≤ 0.6× our uncompressed image's disk use
# Our binary: a private copy of DEDUP_BIN (default target/release/dedup-snapshotter; nothing is built) taken at start.
# Results: BENCH_DIR/compress.md and compress.json (BENCH_DIR defaults to target/bench), raw samples in
# BENCH_DIR/compress-raw.tsv.  Mounts and temporary files are removed on exit.  About 1 minute per repetition of
# the default rows on 2 cores; the CPUs are shared, so compare rows within one run only.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { echo "bench-compress: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# --pcluster-size (before the shared options, which getopts would refuse)
PCLUSTER=${PCLUSTER:-}
args=()
while (($#)); do
    case $1 in
    --pcluster-size) PCLUSTER=${2:?--pcluster-size wants a number of bytes}; shift 2 ;;
    --pcluster-size=*) PCLUSTER=${1#--pcluster-size=}; shift ;;
    *) args+=("$1"); shift ;;
    esac
done
set -- "${args[@]+"${args[@]}"}"
# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

if (($#)); then ALGOS=("$@"); else read -r -a ALGOS <<<"${BENCH_ALGOS:-lz4 lz4hc zstd deflate}"; fi
((${#ALGOS[@]})) || die "no algorithms"
for a in "${ALGOS[@]}"; do
    [[ $a =~ ^(lz4|lz4hc|zstd|deflate|lzma)(,[0-9]+)?$ ]] || die "unknown algorithm $a (lz4, lz4hc[,N], zstd[,N], deflate[,N], lzma[,N])"
    [[ $a != lz4,* ]] || die "lz4 takes no level"
done
[[ -z $PCLUSTER || $PCLUSTER =~ ^[1-9][0-9]*$ ]] || die "--pcluster-size wants a number of bytes"

[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, drop_caches)"
for b in python3 find xargs sha256sum stat sync nice mountpoint; do
    command -v "$b" >/dev/null || die "$b missing"
done

SRC_BIN=${DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
[[ -x "$SRC_BIN" ]] || die "$SRC_BIN missing (build it: cargo build --release -p dedup-snapshotter)"
# shellcheck source=scripts/lib/erofs-utils.sh
. "$ROOT/scripts/lib/erofs-utils.sh"
EROFS_BIN=$(erofs_utils_install) || die "erofs-utils $EROFS_UTILS_VERSION unavailable (scripts/lib/erofs-utils.sh)"
MKFS=$EROFS_BIN/mkfs.erofs
FSCK=$EROFS_BIN/fsck.erofs
LAYER=$(bash "$ROOT/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh") || die "debian-minbase.sh failed"
[[ -s "$LAYER" ]] || die "no minbase layer at $LAYER"

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
RAW=$BENCH_DIR/compress-raw.tsv
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

WORK=$(mktemp -d /tmp/bench-compress.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if mountpoint -q "$MNT"; then umount "$MNT" || umount -l "$MNT" || log "cannot unmount $MNT"; fi
    if awk -v d="$WORK/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        log "still mounted under $WORK; kept"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "$SRC_BIN" "$WORK/dedup-snapshotter"
BIN=$WORK/dedup-snapshotter
OUR_VERSION=$("$BIN" --version 2>&1 | head -n 1)
MKFS_VERSION=$("$MKFS" -V 2>&1 | head -n 1)
GIT_REV=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo "?")
[[ -z "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] || GIT_REV+="-dirty"

# The rows: TOOL:SPEC, SPEC one of none, none-noinline, ALGO[,LEVEL].
ROWS=(ours:none mkfs:none ours:none-noinline mkfs:none-noinline)
for a in "${ALGOS[@]}"; do ROWS+=("ours:$a" "mkfs:$a"); done

mkfs_z() { # ALGO[,LEVEL] -> mkfs.erofs's -z argument (our deflate is libdeflate)
    local algo=${1%%,*} level=
    [[ $1 == *,* ]] && level=${1#*,}
    [[ $algo == deflate ]] && algo=libdeflate
    echo "-z$algo${level:+,level=$level}"
}

convert_cmd() { # TOOL SPEC OUT: sets CMD
    local tool=$1 spec=$2 out=$3
    if [[ $tool == ours ]]; then
        CMD=(nice -n 5 "$BIN" convert)
        [[ $spec == none-noinline ]] && CMD+=(--no-inline)
        if [[ $spec != none* ]]; then
            # NO_INLINE=1: compressed images as the snapshotter stores layers (block-aligned plain files).
            [[ -z ${NO_INLINE:-} ]] || CMD+=(--no-inline)
            CMD+=(--compress "$spec")
            [[ -z $PCLUSTER ]] || CMD+=(--pcluster-size "$PCLUSTER")
        fi
        CMD+=("$LAYER" "$out")
    else
        CMD=(nice -n 5 "$MKFS" --quiet --tar=f --ungzip)
        [[ $spec == none-noinline || ( $spec != none && -n ${NO_INLINE:-} ) ]] && CMD+=(-Enoinline_data)
        # Ours packs compressed tails after their inodes whenever it inlines: so does mkfs.erofs here.
        [[ $spec == none* || -n ${NO_INLINE:-} ]] || CMD+=(-Eztailpacking)
        if [[ $spec != none* ]]; then
            CMD+=("$(mkfs_z "$spec")")
            [[ -z $PCLUSTER ]] || CMD+=("-C$PCLUSTER")
        fi
        CMD+=("$out" "$LAYER")
    fi
}

# mount(2) of the image file itself (util-linux mount would set up a loop device).
mount_erofs() { # IMG DIR
    python3 - "$1" "$2" <<'PY'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1
if libc.mount(sys.argv[1].encode(), sys.argv[2].encode(), b"erofs", MS_RDONLY, None) != 0:
    e = ctypes.get_errno()
    sys.exit(f"mount(2) -t erofs -o ro {sys.argv[1]} {sys.argv[2]}: {os.strerror(e)} (errno {e})")
PY
}

READ_ALL_DESC='find MNT -xdev -type f -exec cat {} + >/dev/null'
read_all() { nice -n 5 find "$MNT" -xdev -type f -exec cat {} + >/dev/null 2>"$WORK/read.err"; }

manifest() { # OUT: the mounted tree's manifest
    (
        cd "$MNT"
        find . -xdev -printf 'i %y %m %U:%G %n %p\n'
        find . -xdev -type l -printf 'l %p -> %l\n'
        find . -xdev -type f -print0 | xargs -0 -r sha256sum | sed 's/^/f /'
    ) | sort >"$1"
}

ERRORS=()
err() {
    ERRORS+=("$*")
    log "ERROR: $*"
}

: >"$RAW"
record() { # REP TOOL SPEC METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"
}

measure() { # REP TOOL SPEC
    local rep=$1 tool=$2 spec=$3 id img out rc size blocks bsize
    id=$tool-${spec//,/-}
    img=$WORK/$id.erofs
    rm -f "$img"
    convert_cmd "$tool" "$spec" "$img"
    sync
    TIMEFORMAT='%R %U %S'
    if ! { time "${CMD[@]}" >"$WORK/convert.log" 2>&1; } 2>"$WORK/time"; then
        err "convert failed: ${CMD[*]}"$'\n'"$(tail -n 20 "$WORK/convert.log")"
        return 0
    fi
    local wall user sys
    read -r wall user sys <"$WORK/time"
    sync
    record "$rep" "$tool" "$spec" convert_s "$wall"
    record "$rep" "$tool" "$spec" convert_cpu_s "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.3f", u + s }')"
    read -r size blocks bsize < <(stat -c '%s %b %B' "$img")
    record "$rep" "$tool" "$spec" size_bytes "$size"
    record "$rep" "$tool" "$spec" disk_bytes "$((blocks * bsize))"

    rc=0
    out=$(nice -n 5 "$FSCK" --extract "$img" 2>&1) || rc=$?
    if ((rc)); then
        local keep=$BENCH_DIR/compress-fsck-failed-$id.erofs
        cp "$img" "$keep"
        err "fsck failed (rep $rep, rc $rc): $FSCK --extract $img  [image kept: $keep; made by: ${CMD[*]}]"$'\n'"$out"
    fi

    sync
    echo 3 >/proc/sys/vm/drop_caches
    if ! out=$(mount_erofs "$img" "$MNT" 2>&1); then
        err "mount failed (rep $rep): $out  [image made by: ${CMD[*]}]"
        return 0
    fi
    local t cold warm
    t=$EPOCHREALTIME
    if read_all; then
        cold=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.4f", b - a }')
        record "$rep" "$tool" "$spec" read_cold_s "$cold"
    else
        err "read-all (cold) failed on $img (rep $rep, made by: ${CMD[*]}): $(head -n 20 "$WORK/read.err")"
    fi
    t=$EPOCHREALTIME
    if read_all; then
        warm=$(awk -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.4f", b - a }')
        record "$rep" "$tool" "$spec" read_warm_s "$warm"
    else
        err "read-all (warm) failed on $img (rep $rep, made by: ${CMD[*]}): $(head -n 20 "$WORK/read.err")"
    fi
    if ((rep == 1)); then manifest "$WORK/$id.manifest"; fi
    umount "$MNT"
    rm -f "$img"
    log "rep $rep $tool $spec: $((size / 1000))K, convert ${wall}s, read-all cold ${cold:-?}s warm ${warm:-?}s"
}

log "$OUR_VERSION (copy of $SRC_BIN), $MKFS_VERSION, layer $LAYER, load $LOAD_START"
for ((rep = 1; rep <= REPS; rep++)); do
    for row in "${ROWS[@]}"; do
        tool=${row%%:*} spec=${row#*:}
        # ours and mkfs.erofs rows come in pairs; the pair's order alternates between repetitions
        if ((rep % 2 == 0)); then
            [[ $tool == ours ]] && tool=mkfs || tool=ours
        fi
        measure "$rep" "$tool" "$spec"
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# Content: every tree as mkfs.erofs's uncompressed image.
REF=$WORK/mkfs-none.manifest
ndiff=0
if [[ -s $REF ]]; then
    manifests=("$WORK"/*.manifest)
    for m in "${manifests[@]}"; do
        [[ $m == "$REF" ]] && continue
        if ! cmp -s "$REF" "$m"; then
            ndiff=$((ndiff + 1))
            err "content of $(basename "$m" .manifest) differs from mkfs-none's:"$'\n'"$(diff "$REF" "$m" | head -n 20)"
        fi
    done
    CONTENT="all $((${#manifests[@]} - 1)) other trees equal to mkfs.erofs's uncompressed one \
($(grep -c '^i ' "$REF") entries, $(grep -c '^f ' "$REF") regular files)"
    ((ndiff == 0)) || CONTENT="$ndiff tree(s) DIFFER from mkfs.erofs's uncompressed one (see the errors)"
else
    CONTENT="no reference manifest (mkfs none failed)"
fi

python3 - "$BENCH_DIR" "$RAW" "$REPS" "$PCLUSTER" "$OUR_VERSION" "$MKFS_VERSION" "$GIT_REV" "$LOAD_START" \
    "$LOAD_END" "$LAYER" "$READ_ALL_DESC" "$CONTENT" "${ROWS[@]}" <<'PY'
import json, os, platform, statistics, sys, time

(out_dir, raw, reps, pcluster, our_ver, mkfs_ver, git_rev, load0, load1, layer, read_desc, content,
 *rows) = sys.argv[1:]
reps = int(reps)
S = {}
for line in open(raw):
    rep, tool, spec, metric, value = line.rstrip("\n").split("\t")
    S.setdefault((tool, spec, metric), []).append(float(value))

def med(tool, spec, metric):
    xs = S.get((tool, spec, metric))
    return statistics.median(xs) if xs else None

def ratio(a, b):
    return a / b if a is not None and b else None

def mkfs_flag(spec):
    algo, _, level = spec.partition(",")
    algo = "libdeflate" if algo == "deflate" else algo
    return f"-z{algo}" + (f",level={level}" if level else "")

def label(tool, spec):
    ni = bool(os.environ.get("NO_INLINE"))
    if tool == "ours":
        z = f"ours --compress {spec}" + (" --no-inline" if ni else "")
        return {"none": "ours", "none-noinline": "ours --no-inline"}.get(spec, z)
    z = f"mkfs.erofs {mkfs_flag(spec)} " + ("-Enoinline_data" if ni else "-Eztailpacking")
    return {"none": "mkfs.erofs", "none-noinline": "mkfs.erofs -Enoinline_data"}.get(spec, z)

base = {m: med("ours", "none", m) for m in ("size_bytes", "disk_bytes", "read_cold_s", "read_warm_s")}
base_ni = {m: med("ours", "none-noinline", m) for m in ("size_bytes", "disk_bytes", "read_cold_s", "read_warm_s")}
out_rows = []
for row in rows:
    tool, spec = row.split(":", 1)
    r = {"tool": tool, "spec": spec, "label": label(tool, spec)}
    for m in ("size_bytes", "disk_bytes", "convert_s", "convert_cpu_s", "read_cold_s", "read_warm_s"):
        r[m] = med(tool, spec, m)
        r[m + "_samples"] = S.get((tool, spec, m), [])
    other = "mkfs" if tool == "ours" else None
    r["size_vs_mkfs"] = ratio(r["size_bytes"], med("mkfs", spec, "size_bytes")) if other else None
    r["convert_vs_mkfs"] = ratio(r["convert_s"], med("mkfs", spec, "convert_s")) if other else None
    r["size_vs_uncompressed"] = ratio(r["size_bytes"], base["size_bytes"])
    r["disk_vs_uncompressed"] = ratio(r["disk_bytes"], base["disk_bytes"])
    r["cold_vs_uncompressed"] = ratio(r["read_cold_s"], base["read_cold_s"])
    r["warm_vs_uncompressed"] = ratio(r["read_warm_s"], base["read_warm_s"])
    out_rows.append(r)

MB = lambda b: "—" if b is None else f"{b / 1e6:.1f}"
SEC = lambda s: "—" if s is None else f"{s:.2f}"
RT = lambda x: "" if x is None else f"{x:.2f}"

meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": reps, "kernel": platform.release(),
        "cpus": os.cpu_count(), "ours": our_ver, "git": git_rev, "mkfs": mkfs_ver,
        "pcluster_size": int(pcluster) if pcluster else None, "layer": layer,
        "layer_bytes": os.path.getsize(layer), "load_start": load0, "load_end": load1, "read_all": read_desc,
        "content": content}
md = ["# Compression: our converter vs mkfs.erofs", "",
      f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs; {our_ver} (worktree {git_rev}); {mkfs_ver}.",
      f"Input: {layer} ({meta['layer_bytes'] / 1e6:.1f} MB); median of {reps} run(s); "
      f"pcluster size: {pcluster + ' bytes (ours --pcluster-size, mkfs -C)' if pcluster else 'default (4096)'}; "
      f"load average at start {load0}, at end {load1}.",
      f"Read-all: `{read_desc}` on a file-backed read-only mount; cold = after drop_caches. "
      "\"vs unc.\" = vs our uncompressed default image (first row).", "",
      "| image | size MB | vs mkfs | vs unc. | disk MB | convert s | CPU s | vs mkfs | cold s | vs unc. | warm s | vs unc. |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in out_rows:
    md.append(f"| {r['label']} | {MB(r['size_bytes'])} | {RT(r['size_vs_mkfs'])} | {RT(r['size_vs_uncompressed'])} | "
              f"{MB(r['disk_bytes'])} | {SEC(r['convert_s'])} | {SEC(r['convert_cpu_s'])} | "
              f"{RT(r['convert_vs_mkfs'])} | {SEC(r['read_cold_s'])} | {RT(r['cold_vs_uncompressed'])} | "
              f"{SEC(r['read_warm_s'])} | {RT(r['warm_vs_uncompressed'])} |")
md += ["", f"Content: {content}.", "", "## Targets", ""]

targets = []
def target(what, value, limit, extra=""):
    ok = None if value is None else value <= limit
    targets.append({"target": what, "value": value, "limit": limit, "pass": ok})
    v = "not measured" if value is None else f"{value:.3f}"
    md.append(f"- {what}: {v} (≤ {limit}){extra} — {'PASS' if ok else 'MISS' if ok is False else 'n/a'}")
get = lambda spec: next((r for r in out_rows if r["tool"] == "ours" and r["spec"] == spec), None)
comp = [r for r in out_rows if r["tool"] == "ours" and not r["spec"].startswith("none")]
for r in comp:
    target(f"size {r['spec']}: ours/mkfs.erofs ({MB(r['size_bytes'])} vs "
           f"{MB(med('mkfs', r['spec'], 'size_bytes'))} MB)", r["size_vs_mkfs"], 1.03)
for r in comp:
    target(f"convert time {r['spec']}: ours/mkfs.erofs ({SEC(r['convert_s'])} vs "
           f"{SEC(med('mkfs', r['spec'], 'convert_s'))} s)", r["convert_vs_mkfs"], 1.0)
lz4 = next((r for r in comp if r["spec"].split(",")[0] == "lz4"), None)
target("read-all cold, lz4 / our uncompressed" + (
    f" ({SEC(lz4['read_cold_s'])} vs {SEC(base['read_cold_s'])} s)" if lz4 else ""),
    lz4 and lz4["cold_vs_uncompressed"], 1.0,
    f"; vs --no-inline: {RT(ratio(lz4['read_cold_s'], base_ni['read_cold_s']))}" if lz4 else "")
hc = next((r for r in comp if r["spec"].split(",")[0] == "lz4hc"), None)
target("disk, " + (hc["spec"] if hc else "lz4hc") + " / our uncompressed" + (
    f" ({MB(hc['disk_bytes'])} vs {MB(base['disk_bytes'])} MB)" if hc else ""),
    hc and hc["disk_vs_uncompressed"], 0.6,
    f"; vs --no-inline: {RT(ratio(hc['disk_bytes'], base_ni['disk_bytes']))}" if hc else "")

with open(os.path.join(out_dir, "compress.json"), "w") as f:
    json.dump({"meta": meta, "rows": out_rows, "targets": targets}, f, indent=2)
    f.write("\n")
text = "\n".join(md) + "\n"
with open(os.path.join(out_dir, "compress.md"), "w") as f:
    f.write(text)
print(text)
PY
log "results in $BENCH_DIR/compress.{md,json}, samples in $RAW"

if ((${#ERRORS[@]})); then
    log "${#ERRORS[@]} error(s):"
    for e in "${ERRORS[@]}"; do printf -- '- %s\n' "$e" >&2; done
    exit 1
fi
