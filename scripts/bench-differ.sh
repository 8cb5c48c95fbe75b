#!/usr/bin/env bash
# The differ benchmark: one layer blob applied three ways, in one run, through the same containerd 1.6.
#
#   sudo scripts/bench-differ.sh [-n REPS]
#
# The blob is the minbase layer (debootstrap bookworm minbase, one ~93 MB tar+gzip layer, ~211 MB / 6,768 entries
# uncompressed; scripts/build-test-images.sh), ingested once into containerd's content store.  Each measurement is
# one `diffclient apply DIGEST MEDIATYPE "" KEY` (scripts/harness/diffclient.sh: containerd 1.6's own client
# code doing Prepare + Apply + Commit), timed as a whole from the outside:
#   a  erofs     our Diff service's erofs differ: Apply onto a fresh dedup snapshot converts the gzip stream into
#                the snapshot's layer.erofs in one pass; Commit has nothing left to convert.
#   b  walking   the containerd 1.6 path: diffclient without -diff, so containerd's own walking differ mounts the
#                dedup snapshot, extracts the tar into it, and our Commit converts the directory to EROFS.
#   c  overlayfs containerd's own walking differ unpacking into its builtin overlayfs snapshotter (no EROFS).
# The order of a, b, c rotates between repetitions; `sync` runs (untimed) before each measurement, and every
# snapshot is removed (and the stores checked empty) between measurements.  Checks: each `a` shows up in the
# daemon's log as a successful Apply of the blob, and `b`/`c` never reach our Diff service.
# The median over REPS (default 3, or BENCH_REPS) is reported with the ratios a/b (target ≤ 0.6) and a/c
# (target ≤ 0.8).  Results: BENCH_DIR/differ.json and differ.md (BENCH_DIR defaults to target/bench), raw samples
# in BENCH_DIR/differ-raw.tsv.  Everything the script starts is stopped and its directory removed on exit.
# BENCH_NO_BUILD=1 skips `cargo build --release` of the daemon.  DIFFCLIENT overrides the client's path.
# BENCH_LOOP_EXT4=1 puts the whole environment (registry, containerd root, snapshotter root) on a fresh ext4 in a
# sparse 8 GB loop-mounted file under /tmp instead of /tmp itself: a known file system whatever /tmp is mounted
# with (tmpfs cannot hold the dedup root: file-backed EROFS mounts fail there with ENOTBLK).  The run records
# the file system and mount options it used.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

log() { echo "bench-differ: $*" >&2; }
die() {
    log "$*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (containerd, mounts)"
for b in ctr containerd python3 sha256sum; do
    command -v "$b" >/dev/null || die "$b missing (apt-get install -y containerd python3)"
done
DIFFCLIENT=${DIFFCLIENT:-$ROOT/scripts/harness/diffclient.sh}
[[ -x "$DIFFCLIENT" ]] || die "$DIFFCLIENT missing (containerd's client code driving a Diff service)"

BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
RAW=$BENCH_DIR/differ-raw.tsv

if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
    log "cargo build --release -p dedup-snapshotter"
    cargo build --release -q -p dedup-snapshotter --bin dedup-snapshotter
fi
BIN=$ROOT/target/release/dedup-snapshotter
[[ -x "$BIN" ]] || die "target/release/dedup-snapshotter missing"

ENV_DIR=$(mktemp -d /tmp/bench-diff.XXXXXX)
LOOP_IMG=""
# shellcheck source=scripts/lib/bench-env.sh
. "$ROOT/scripts/lib/bench-env.sh"
bench_env_trap

if [[ -n "${BENCH_LOOP_EXT4:-}" ]]; then
    LOOP_IMG=$ENV_DIR.ext4
    truncate -s 8G "$LOOP_IMG"
    mkfs.ext4 -q -F "$LOOP_IMG"
    mount -o loop "$LOOP_IMG" "$ENV_DIR"
fi
FSTYPE="$(findmnt -n -o FSTYPE -T "$ENV_DIR") $(findmnt -n -o OPTIONS -T "$ENV_DIR")"
if [[ -n $LOOP_IMG ]]; then FSTYPE="$FSTYPE (loop file)"; fi

# Build diffclient (Go) before anything is timed.
"$DIFFCLIENT" >/dev/null 2>&1 || true

log "starting the environment in $ENV_DIR"
"$ROOT/scripts/e2e-env.sh" start "$ENV_DIR" \
    "$BIN serve --root {root} --address {socket} --containerd $ENV_DIR/containerd.sock" \
    >"$ENV_DIR/start.log" 2>&1 || die "e2e-env.sh start: $(cat "$ENV_DIR/start.log")"
# shellcheck disable=SC1091
source "$ENV_DIR/env"
NS=bench
OVL_DIR=$ENV_DIR/containerd/root/io.containerd.snapshotter.v1.overlayfs
DEDUP_DIR=$E2E_SNAPSHOTTER_ROOT
DLOG=$ENV_DIR/logs/snapshotter.log

ctr_() { ctr -a "$E2E_CONTAINERD_SOCK" -n "$NS" "$@"; }
dc() { # DIFF_SOCK|- SNAPSHOTTER ARGS...
    local sock=$1 snap=$2
    shift 2
    if [[ $sock == - ]]; then
        "$DIFFCLIENT" -address "$E2E_CONTAINERD_SOCK" -snapshotter "$snap" -namespace "$NS" "$@"
    else
        "$DIFFCLIENT" -address "$E2E_CONTAINERD_SOCK" -diff "$sock" -snapshotter "$snap" -namespace "$NS" "$@"
    fi
}


# The blob: the minbase layer, straight from the OCI layout the registry was filled from.
OCI=${E2E_IMAGES:-/var/cache/dedup-snapshotter-tests/oci}/minbase
read -r MEDIA DIGEST SIZE < <(python3 - "$OCI" <<'PY'
import json, sys
d = sys.argv[1]
blob = lambda dg: f"{d}/blobs/{dg.replace(':', '/')}"
idx = json.load(open(f"{d}/index.json"))
man = json.load(open(blob(idx["manifests"][0]["digest"])))
assert len(man["layers"]) == 1, "minbase has one layer"
l = man["layers"][0]
print(l["mediaType"], l["digest"], l["size"])
PY
)
BLOB=$OCI/blobs/${DIGEST/://}
[[ -f "$BLOB" ]] || die "$BLOB missing"
ctr_ content ingest --expected-digest "$DIGEST" --expected-size "$SIZE" bench-minbase <"$BLOB" >/dev/null
ctr_ content label "$DIGEST" containerd.io/gc.root=bench >/dev/null
log "blob $DIGEST ($MEDIA, $SIZE bytes)"

applies_of_blob() { sed 's/\x1b\[[0-9;]*m//g' "$DLOG" | grep -c "rpc=\"Apply\" digest=$DIGEST ok=true" || true; }
apply_calls() { sed 's/\x1b\[[0-9;]*m//g' "$DLOG" | grep -c 'rpc="Apply"' || true; }
last_apply_micros() {
    sed 's/\x1b\[[0-9;]*m//g' "$DLOG" | grep "rpc=\"Apply\" digest=$DIGEST ok=true" | tail -n 1 |
        sed -n 's/.* micros=\([0-9]*\).*/\1/p'
}

snapshots_of() { ctr_ snapshots --snapshotter "$1" ls | tail -n +2; }
first_entry() { if [[ -d "$1" ]]; then find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n 1; fi; }

wait_clean() { # no snapshots in either snapshotter, nor their dirs
    local i
    for ((i = 0; i < 300; i++)); do
        if [[ -z "$(snapshots_of dedup)" && -z "$(snapshots_of overlayfs)" &&
            -z "$(first_entry "$DEDUP_DIR/snapshots")" && -z "$(first_entry "$OVL_DIR/snapshots")" ]]; then
            return 0
        fi
        sleep 0.1
    done
    die "the snapshot stores did not empty: dedup [$(snapshots_of dedup | tr '\n' ' ')]" \
        "overlayfs [$(snapshots_of overlayfs | tr '\n' ' ')]"
}

: >"$RAW"
record() { # METHOD METRIC REP VALUE
    printf '%s\t%s\t%s\t%s\n' "$@" >>"$RAW"
}

measure() { # REP METHOD
    local rep=$1 method=$2 key=bench-$1-$2 sock snap before calls t s out
    case $method in
    erofs) sock=$E2E_SNAPSHOTTER_SOCK snap=dedup ;;
    walking) sock=- snap=dedup ;;
    overlayfs) sock=- snap=overlayfs ;;
    esac
    wait_clean
    sync
    before=$(applies_of_blob)
    calls=$(apply_calls)
    t=$(now)
    out=$(dc "$sock" "$snap" apply "$DIGEST" "$MEDIA" "" "$key" 2>&1) || die "$method apply: $out"
    s=$(since "$t")
    record "$method" apply_s "$rep" "$s"
    if [[ $method == erofs ]]; then
        (($(applies_of_blob) == before + 1)) || die "erofs: no successful Apply of $DIGEST in $DLOG"
        record "$method" server_apply_s "$rep" "$(awk -v m="$(last_apply_micros)" 'BEGIN { printf "%.4f", m / 1e6 }')"
        [[ -n "$(find "$DEDUP_DIR/snapshots" -mindepth 2 -maxdepth 2 -name layer.erofs -print -quit)" ]] ||
            die "erofs: no layer.erofs after the apply"
    else
        (($(apply_calls) == calls)) || die "$method: the apply reached our Diff service (it should be containerd's)"
    fi
    grep -q "\"digest\":\"sha256:" <<<"$out" || die "$method: unexpected output $out"
    log "rep $rep $method: ${s}s"
    ctr_ snapshots --snapshotter "$snap" rm "$key" >/dev/null
    wait_clean
}

methods=(erofs walking overlayfs)
for ((rep = 1; rep <= REPS; rep++)); do
    k=$(((rep - 1) % 3))
    order=("${methods[@]:k}" "${methods[@]:0:k}")
    for m in "${order[@]}"; do
        measure "$rep" "$m"
    done
done

python3 - "$BENCH_DIR" "$RAW" "$REPS" "$DIGEST" "$SIZE" "$MEDIA" "$FSTYPE" <<'PY'
import json, os, platform, statistics, subprocess, sys, time

out_dir, raw, reps, digest, size, media, fstype = sys.argv[1:8]
reps, size = int(reps), int(size)
samples = {}
for line in open(raw):
    method, metric, rep, value = line.rstrip("\n").split("\t")
    samples.setdefault((method, metric), []).append(float(value))

what = {
    "erofs": "a: our erofs differ (one-pass Apply into layer.erofs) + Commit",
    "walking": "b: containerd's walking differ into a dedup snapshot + our Commit conversion (containerd 1.6 path)",
    "overlayfs": "c: containerd's walking differ into its overlayfs snapshotter",
}
rows = []
for m in ("erofs", "walking", "overlayfs"):
    xs = samples.get((m, "apply_s"), [])
    rows.append({"method": m, "what": what[m], "median_s": round(statistics.median(xs), 4),
                 "samples_s": xs})
srv = samples.get(("erofs", "server_apply_s"), [])
med = {r["method"]: r["median_s"] for r in rows}
ratios = [
    {"ratio": "a/b", "value": round(med["erofs"] / med["walking"], 3), "target_max": 0.6},
    {"ratio": "a/c", "value": round(med["erofs"] / med["overlayfs"], 3), "target_max": 0.8},
]
for r in ratios:
    r["meets_target"] = r["value"] <= r["target_max"]

def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"

meta = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "reps": reps,
    "kernel": platform.release(),
    "cpus": os.cpu_count(),
    "containerd": ver(["containerd", "--version"]),
    "blob": {"digest": digest, "size": size, "media_type": media, "image": "minbase"},
    "filesystem": fstype,
    "timed": "one `diffclient apply DIGEST MEDIATYPE \"\" KEY` (Prepare + Apply + Commit), wall time",
}
result = {"meta": meta, "rows": rows, "ratios": ratios,
          "erofs_server_apply_s": {"median": round(statistics.median(srv), 4) if srv else None, "samples": srv}}
with open(os.path.join(out_dir, "differ.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

md = ["# Diff service: applying one layer three ways", "",
      f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, {meta['containerd']}; "
      f"median of {reps} run(s); stores on `{fstype}`.  Blob: the minbase layer ({media}, {size / 1e6:.1f} MB).  "
      "Each time is one `diffclient apply` (Prepare + Apply + Commit) as containerd's client runs it.", "",
      "| method | median s (min–max) |", "|---|---:|"]
for r in rows:
    xs = r["samples_s"]
    md.append(f"| {r['what']} | {r['median_s']:.3f} ({min(xs):.3f}–{max(xs):.3f}) |")
md += ["", "| ratio | value | target | ok |", "|---|---:|---:|:---:|"]
for r in ratios:
    md.append(f"| {r['ratio']} | {r['value']:.2f} | ≤ {r['target_max']} | {'yes' if r['meets_target'] else 'NO'} |")
if srv:
    md += ["", f"The daemon's own Apply time for a (from its log): median {statistics.median(srv):.3f} s "
           f"({min(srv):.3f}–{max(srv):.3f}); the rest of a is Prepare, Commit and the client."]
text = "\n".join(md) + "\n"
with open(os.path.join(out_dir, "differ.md"), "w") as f:
    f.write(text)
print(text)
PY
log "results in $BENCH_DIR/differ.{json,md}"
