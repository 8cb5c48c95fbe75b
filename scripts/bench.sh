#!/bin/bash
# The converter benchmark: a real layer (debootstrap bookworm minbase rootfs
# as one tar+gzip layer, ~93 MB compressed, ~210 MB, ~6,800 entries),
# everything measured in one run on this machine.
#
#   sudo scripts/bench.sh [-n REPS] [LAYER.tar.gz]
#
# Rows (each run REPS times, default 3, interleaved; the median is reported):
#   decompress (converter)   dedup-snapshotter bench-decompress: the same
#                            decompressor as convert (flate2 with zlib-rs for
#                            gzip, zstd), output discarded; for .tar.gz and
#                            .tar.zst (only when the binary has the command)
#   gzip -dc, pigz -dc       reference decompressors, output to /dev/null
#   convert .tar.gz          dedup-snapshotter convert --json  -> image
#   tar -xzf, mkfs.erofs     the two-step baseline: extract into a fresh dir,
#                            then erofs-utils mkfs.erofs (default options, and
#                            -Enoinline_data, both from the same extraction)
#   zstd -dc, convert .tar.zst, convert .tar
# Wall time (bash $EPOCHREALTIME around /usr/bin/time, µs resolution) and
# peak RSS (/usr/bin/time %M).  The input is read into the page cache before
# every measurement; outputs go to BENCH_DIR and are removed after each run.
#
# Ratios printed (targets from the issue):
#   convert(.tar.gz) / decompression alone      <= 1.15
#   (tar -xzf + mkfs.erofs) / convert(.tar.gz)  >= 1.8
# Results: BENCH_DIR/results.json and BENCH_DIR/results.md (BENCH_DIR
# defaults to target/bench); raw samples in BENCH_DIR/raw.tsv.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

die() {
    printf 'bench.sh: FATAL: %s\n' "$*" >&2
    exit 1
}
note() { printf '%s\n' "$*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (tar -x of a rootfs with device nodes and owners)"
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

declare -A PKG_FILE=(
    [erofs-utils]=/usr/bin/mkfs.erofs
    [pigz]=/usr/bin/pigz
    [zstd]=/usr/bin/zstd
    [time]=/usr/bin/time
    [python3]=/usr/bin/python3
    [debootstrap]=/usr/sbin/debootstrap
)
missing=()
for pkg in "${!PKG_FILE[@]}"; do
    [[ -e "${PKG_FILE[$pkg]}" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    note "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
WORK="$BENCH_DIR/work"
BIN="$ROOT/target/release/dedup-snapshotter"

cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK"

note "==> cargo build --release -p dedup-snapshotter"
cargo build --release -p dedup-snapshotter >&2

# --- inputs -------------------------------------------------------------------
if [[ $# -ge 1 ]]; then
    TGZ=$(realpath "$1")
else
    FIXTURE=crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh
    [[ -f $FIXTURE ]] || die "$FIXTURE not found: pass a LAYER.tar.gz"
    note "==> fixture: $FIXTURE"
    TGZ=$(bash "$FIXTURE")
fi
[[ -s $TGZ ]] || die "no input layer at '$TGZ'"
TAR=${TGZ%.gz}
if [[ $TAR == "$TGZ" || ! -s $TAR ]]; then
    TAR="$BENCH_DIR/input.tar"
    note "==> gzip -dc $TGZ > $TAR"
    gzip -dc "$TGZ" >"$TAR.tmp" && mv -f "$TAR.tmp" "$TAR"
fi
ZST="$BENCH_DIR/$(basename "$TAR").zst"
if [[ ! -s $ZST || $ZST -ot $TAR ]]; then
    note "==> zstd -3 -T0 $TAR -> $ZST"
    zstd -q -f -3 -T0 "$TAR" -o "$ZST.tmp" && mv -f "$ZST.tmp" "$ZST"
fi

# --- what the binary can do -----------------------------------------------------
HAVE_CONVERT=0 DECOMP=
has_cmd() {
    local help
    [[ -x $BIN ]] || return 1
    help=$("$BIN" "$1" --help 2>&1) || return 1
    grep -qi "^usage:.*$1" <<<"$help"
}
has_cmd convert && HAVE_CONVERT=1
for c in bench-decompress bench-gunzip; do
    if has_cmd "$c"; then
        DECOMP=$c
        break
    fi
done
((HAVE_CONVERT)) || note "warning: '$BIN convert' is not available: convert rows skipped"
[[ -n $DECOMP ]] || note "note: '$BIN bench-decompress' is not available: gzip -dc stands in for decompression alone"

# --- measuring --------------------------------------------------------------------
RAW="$BENCH_DIR/raw.tsv"
LOG="$BENCH_DIR/bench.log"
TF="$WORK/time.out"
printf 'row\trep\twall_s\ttime_e_s\tmaxrss_kb\n' >"$RAW"
: >"$LOG"

warm() { cat "$@" >/dev/null; }

# measure ROW REP STDOUT_FILE CMD...   (stderr goes to bench.log)
measure() {
    local row=$1 rep=$2 out=$3 t0 t1 rc=0 e m us
    shift 3
    echo "## $row rep $rep: $*" >>"$LOG"
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%e %M' -o "$TF" "$@" >"$out" 2>>"$LOG" || rc=$?
    t1=$EPOCHREALTIME
    if ((rc != 0)); then
        tail -n 20 "$LOG" >&2
        die "$row failed (exit $rc): $*"
    fi
    read -r e m <"$TF"
    us=$((10#${t1/./} - 10#${t0/./}))
    printf '%s\t%s\t%d.%06d\t%s\t%s\n' "$row" "$rep" $((us / 1000000)) $((us % 1000000)) "$e" "$m" >>"$RAW"
    printf '  %-28s rep %d: %8.3f s  %7d KiB\n' "$row" "$rep" "$(printf '%d.%06d' $((us / 1000000)) $((us % 1000000)))" "$m" >&2
}

SIZES="$BENCH_DIR/sizes.tsv"
printf 'what\tbytes\n' >"$SIZES"
size_of() {
    local n
    n=$(stat -c %s "$2") || die "$2: no such output"
    printf '%s\t%s\n' "$1" "$n" >>"$SIZES"
}
size_of input.tar.gz "$TGZ"
size_of input.tar "$TAR"
size_of input.tar.zst "$ZST"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
note "==> $REPS repetition(s); input $TGZ; load average $LOAD_START"
for ((rep = 1; rep <= REPS; rep++)); do
    # (a) decompression alone
    if [[ -n $DECOMP ]]; then
        warm "$TGZ"
        measure "decompress tar.gz (converter)" "$rep" "$BENCH_DIR/decompress-tar.gz.$rep.out" "$BIN" "$DECOMP" "$TGZ"
    fi
    warm "$TGZ"
    measure "gzip -dc" "$rep" /dev/null gzip -dc "$TGZ"
    warm "$TGZ"
    measure "pigz -dc" "$rep" /dev/null pigz -dc "$TGZ"

    # (b) one-pass convert
    if ((HAVE_CONVERT)); then
        warm "$TGZ"
        measure "convert tar.gz" "$rep" "$BENCH_DIR/convert-tar.gz.$rep.json" \
            "$BIN" convert --json "$TGZ" "$WORK/convert.erofs"
        if ((rep == 1)); then
            size_of "image convert" "$WORK/convert.erofs"
            if fsck.erofs "$WORK/convert.erofs" >>"$LOG" 2>&1; then
                note "  fsck.erofs on the converted image: OK"
            else
                note "  WARNING: fsck.erofs rejects the converted image (see $LOG)"
            fi
        fi
        rm -f "$WORK/convert.erofs"
    fi

    # (c) tar -xzf + mkfs.erofs
    warm "$TGZ"
    mkdir "$WORK/rootfs"
    measure "tar -xzf" "$rep" /dev/null tar -xzf "$TGZ" -C "$WORK/rootfs"
    measure "mkfs.erofs" "$rep" /dev/null mkfs.erofs --quiet "$WORK/mkfs.erofs" "$WORK/rootfs"
    measure "mkfs.erofs -Enoinline_data" "$rep" /dev/null \
        mkfs.erofs --quiet -Enoinline_data "$WORK/mkfs-noinline.erofs" "$WORK/rootfs"
    if ((rep == 1)); then
        size_of "image mkfs.erofs" "$WORK/mkfs.erofs"
        size_of "image mkfs.erofs -Enoinline_data" "$WORK/mkfs-noinline.erofs"
    fi
    rm -rf "$WORK/rootfs" "$WORK/mkfs.erofs" "$WORK/mkfs-noinline.erofs"

    # (d) zstd and plain tar
    if [[ $DECOMP == bench-decompress ]]; then
        warm "$ZST"
        measure "decompress tar.zst (converter)" "$rep" "$BENCH_DIR/decompress-tar.zst.$rep.out" "$BIN" "$DECOMP" "$ZST"
    fi
    warm "$ZST"
    measure "zstd -dc" "$rep" /dev/null zstd -dc "$ZST"
    if ((HAVE_CONVERT)); then
        warm "$ZST"
        measure "convert tar.zst" "$rep" "$BENCH_DIR/convert-tar.zst.$rep.json" \
            "$BIN" convert --json "$ZST" "$WORK/convert.erofs"
        rm -f "$WORK/convert.erofs"
        warm "$TAR"
        measure "convert tar" "$rep" "$BENCH_DIR/convert-tar.$rep.json" \
            "$BIN" convert --json "$TAR" "$WORK/convert.erofs"
        rm -f "$WORK/convert.erofs"
    fi
done

# --- summary ------------------------------------------------------------------------
META="$BENCH_DIR/meta.tsv"
{
    printf 'key\tvalue\n'
    printf 'date\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'commit\t%s\n' "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    printf 'kernel\t%s\n' "$(uname -r)"
    printf 'cpus\t%s\n' "$(nproc)"
    printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    printf 'erofs-utils\t%s\n' "$(dpkg-query -W -f='${Version}' erofs-utils 2>/dev/null || echo '?')"
    printf 'gzip\t%s\n' "$(gzip --version | head -n1)"
    printf 'pigz\t%s\n' "$(pigz --version 2>&1 | head -n1)"
    printf 'zstd\t%s\n' "$(zstd --version | head -n1)"
    printf 'reps\t%s\n' "$REPS"
    printf 'loadavg_start\t%s\n' "$LOAD_START"
    printf 'loadavg_end\t%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'input\t%s\n' "$TGZ"
    printf 'decompress_command\t%s\n' "${DECOMP:-none}"
} >"$META"

python3 - "$BENCH_DIR" <<'PY'
import csv, glob, json, os, statistics, sys

d = sys.argv[1]
def tsv(name):
    with open(os.path.join(d, name)) as f:
        return list(csv.DictReader(f, delimiter="\t"))

meta = {r["key"]: r["value"] for r in tsv("meta.tsv")}
sizes = {r["what"]: int(r["bytes"]) for r in tsv("sizes.tsv")}
samples = {}
for r in tsv("raw.tsv"):
    samples.setdefault(r["row"], {})[int(r["rep"])] = (float(r["wall_s"]), int(r["maxrss_kb"]))

# tar -xzf followed by mkfs.erofs, per repetition
for mk in ["mkfs.erofs", "mkfs.erofs -Enoinline_data"]:
    if "tar -xzf" in samples and mk in samples:
        name = "tar -xzf + " + mk
        samples[name] = {
            rep: (t + samples[mk][rep][0], max(m, samples[mk][rep][1]))
            for rep, (t, m) in samples["tar -xzf"].items() if rep in samples[mk]
        }

order = ["decompress tar.gz (converter)", "gzip -dc", "pigz -dc", "convert tar.gz",
         "tar -xzf", "mkfs.erofs", "mkfs.erofs -Enoinline_data",
         "tar -xzf + mkfs.erofs", "tar -xzf + mkfs.erofs -Enoinline_data",
         "decompress tar.zst (converter)", "zstd -dc", "convert tar.zst", "convert tar"]
rows = []
for name in order + sorted(set(samples) - set(order)):
    if name not in samples:
        continue
    walls = [t for t, _ in samples[name].values()]
    rss = [m for _, m in samples[name].values()]
    rows.append({
        "row": name,
        "median_s": round(statistics.median(walls), 4),
        "min_s": round(min(walls), 4),
        "max_s": round(max(walls), 4),
        "samples_s": [round(t, 4) for t in walls],
        "peak_rss_mib": round(max(rss) / 1024, 1),
    })
med = {r["row"]: r["median_s"] for r in rows}
rss = {r["row"]: r["peak_rss_mib"] for r in rows}

def ratio(name, num, den, target=None, cmp=None):
    if num not in med or den not in med or med[den] == 0:
        return None
    v = med[num] / med[den]
    r = {"ratio": name, "value": round(v, 3), "numerator": num, "denominator": den}
    if target is not None:
        r["target"] = f"{cmp} {target}"
        r["met"] = v <= target if cmp == "<=" else v >= target
    return r

dec = "decompress tar.gz (converter)" if "decompress tar.gz (converter)" in med else "gzip -dc"
ratios = [r for r in [
    ratio("convert / decompression alone", "convert tar.gz", dec, 1.15, "<="),
    ratio("convert / gzip -dc", "convert tar.gz", "gzip -dc") if dec != "gzip -dc" else None,
    ratio("convert / pigz -dc", "convert tar.gz", "pigz -dc"),
    ratio("(tar -xzf + mkfs.erofs) / convert", "tar -xzf + mkfs.erofs", "convert tar.gz", 1.8, ">="),
    ratio("(tar -xzf + mkfs.erofs -Enoinline_data) / convert",
          "tar -xzf + mkfs.erofs -Enoinline_data", "convert tar.gz", 1.8, ">="),
    ratio("convert .tar.zst / decompression alone", "convert tar.zst", "decompress tar.zst (converter)"),
    ratio("convert .tar.zst / zstd -dc", "convert tar.zst", "zstd -dc"),
] if r]

convert_json = {}
for kind in ["tar.gz", "tar.zst", "tar"]:
    p = os.path.join(d, f"convert-{kind}.1.json")
    if os.path.exists(p):
        try:
            convert_json[kind] = json.load(open(p))
        except ValueError:
            convert_json[kind] = {"unparsed": open(p).read()}

result = {"meta": meta, "sizes_bytes": sizes, "rows": rows, "ratios": ratios,
          "convert_peak_rss_mib": {k: rss[k] for k in rss if k.startswith("convert")},
          "convert_json": convert_json}
with open(os.path.join(d, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

mb = lambda b: f"{b / 1e6:.1f} MB"
entries = convert_json.get("tar.gz", {}).get("entries")
md = []
md.append(f"Input: `{os.path.basename(meta['input'])}` {mb(sizes['input.tar.gz'])} gzip, "
          f"{mb(sizes['input.tar'])} tar, {mb(sizes['input.tar.zst'])} zstd"
          + (f", {entries} entries" if entries is not None else "") + ".  ")
md.append(f"Machine: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}; "
          f"erofs-utils {meta['erofs-utils']}; commit {meta['commit']}; {meta['date']}; "
          f"median of {meta['reps']} run(s), page cache warm; "
          f"load average {meta['loadavg_start']} before, {meta['loadavg_end']} after.")
if max(float(meta['loadavg_start'].split()[0]), float(meta['loadavg_end'].split()[0])) > 0.5:
    md.append("")
    md.append("**Warning: the machine was busy with other work during this run; "
              "times are noisy. Rerun on an idle machine for numbers to quote.**")
md.append("")
md.append("| step | median s | min s | max s | peak RSS MiB |")
md.append("| --- | ---: | ---: | ---: | ---: |")
for r in rows:
    md.append(f"| {r['row']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | {r['peak_rss_mib']:.1f} |")
if ratios:
    md.append("")
    md.append("| ratio | value | target |")
    md.append("| --- | ---: | --- |")
for r in ratios:
    t = (r["target"] + (" ✓" if r["met"] else " ✗")) if "target" in r else ""
    md.append(f"| {r['ratio']} | {r['value']:.2f} | {t} |")
imgs = [k for k in sizes if k.startswith("image ")]
if imgs:
    md.append("")
    md.append("| image | size |")
    md.append("| --- | ---: |")
    for k in imgs:
        md.append(f"| {k[6:]} | {mb(sizes[k])} |")
if dec == "gzip -dc":
    md.append("")
    md.append("Decompression alone is measured with `gzip -dc` here (the binary has no "
              "`bench-decompress`), not with the converter's own decompressor.")
text = "\n".join(md) + "\n"
with open(os.path.join(d, "results.md"), "w") as f:
    f.write(text)
print(text)
print(f"written: {os.path.join(d, 'results.json')}, {os.path.join(d, 'results.md')}")
PY
