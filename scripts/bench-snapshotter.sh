#!/usr/bin/env bash
# The snapshotter benchmark: dedup-snapshotter (proxy plugin `dedup`) against containerd's built-in overlayfs
# snapshotter, in one run, through the same containerd 1.6, the same loopback registry and the same images.
#
#   sudo scripts/bench-snapshotter.sh [-n REPS]
#
# The environment is scripts/e2e-env.sh's (private containerd + docker-registry + our daemon), started once.
# Images (scripts/build-test-images.sh): `minbase` (debootstrap bookworm minbase, one ~93 MB gzip layer) and
# `layered` (busybox + 3 small layers with whiteouts).  For each repetition, image and snapshotter X (the order of
# the two snapshotters alternates between repetitions), measured:
#   pull        `ctr image pull --plain-http --snapshotter X` wall time: download + unpack (+ EROFS conversion for
#               dedup).  Before every pull the image is removed with `ctr image rm --sync` and the script waits until
#               containerd's content store and both snapshotters are empty, so each pull downloads and unpacks.
#   run_true    `ctr run --rm --snapshotter X IMG ID /bin/true` wall time, warm (after one untimed run).
#   read_cold   reading every file inside a container (`find / -xdev -type f -exec cat {} + >/dev/null` with the
#               image's own find and cat), page cache dropped (`echo 3 >/proc/sys/vm/drop_caches`) just before
#               the `ctr run`.  Timed inside the container by a tiny static helper bind-mounted at /.bench-timeit
#               (built here with rustc; busybox's date has no sub-second clock), so container start-up is excluded.
#   read_warm   the same right after, cache warm.
#   read_cold_run  (informational) the whole cold `ctr run` of read_cold, start-up and teardown included.
# The median over REPS (default 3, or BENCH_REPS) is reported with the ratio dedup/overlayfs.  Targets (the issue):
#   read-all    dedup ≥ 0.95× overlayfs speed, i.e. time ratio ≤ 1.05 (cold and warm)
#   pull        time ratio ≤ 1.3
# Disk use after pulling minbase: `du -sx` of the dedup root vs containerd's overlayfs snapshotter dir (both with
# only minbase unpacked; content blobs are the same for both and not counted).
# Results: BENCH_DIR/snapshotter.json and snapshotter.md (BENCH_DIR defaults to target/bench), raw samples in
# BENCH_DIR/snapshotter-raw.tsv.  Everything the script starts is stopped and its directory removed on exit.
# BENCH_NO_BUILD=1 skips `cargo build --release` of the daemon.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

log() { echo "bench-snapshotter: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# shellcheck source=scripts/lib/bench-env.sh
. "$ROOT/scripts/lib/bench-env.sh"
bench_setup snapshotter-raw.tsv
[[ -x "$ROOT/target/release/dedup-snapshotter" ]] || die "target/release/dedup-snapshotter missing"

ENV_DIR=$(mktemp -d /tmp/bench-snap.XXXXXX)
bench_env_trap

bench_timeit

log "starting the environment in $ENV_DIR"
"$ROOT/scripts/e2e-env.sh" start "$ENV_DIR" >"$ENV_DIR/start.log" 2>&1 || die "e2e-env.sh start: $(cat "$ENV_DIR/start.log")"
# shellcheck disable=SC1091
source "$ENV_DIR/env"
NS=bench
OVL_DIR=$ENV_DIR/containerd/root/io.containerd.snapshotter.v1.overlayfs
DEDUP_DIR=$E2E_SNAPSHOTTER_ROOT

ctr_() { ctr -a "$E2E_CONTAINERD_SOCK" -n "$NS" "$@"; }


: >"$RAW"
record() { # IMAGE SNAPSHOTTER METRIC REP VALUE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"
}


wait_clean() { # nothing in the content store, no snapshots in either snapshotter (nor their dirs)
    local i
    for ((i = 0; i < 300; i++)); do
        if [[ -z "$(ctr_ content ls -q)" && -z "$(snapshots_of dedup)" && -z "$(snapshots_of overlayfs)" &&
            -z "$(dir_entries "$DEDUP_DIR/snapshots")" && -z "$(dir_entries "$OVL_DIR/snapshots")" ]]; then
            return 0
        fi
        if ((i == 50)); then
            # Whatever GC left: remove content blobs explicitly.
            local blobs
            blobs=$(ctr_ content ls -q)
            # shellcheck disable=SC2086
            [[ -z "$blobs" ]] || ctr_ content rm $blobs >/dev/null 2>&1 || true
        fi
        sleep 0.1
    done
    die "the stores did not empty: content [$(ctr_ content ls -q | tr '\n' ' ')]" \
        "dedup [$(snapshots_of dedup | tr '\n' ' ')] overlayfs [$(snapshots_of overlayfs | tr '\n' ' ')]" \
        "dedup dirs [$(names_in "$DEDUP_DIR/snapshots")]" \
        "overlayfs dirs [$(names_in "$OVL_DIR/snapshots")]"
}

remove_image() { # REF
    ctr_ image rm --sync "$1" >/dev/null
    wait_clean
}


measure() { # REP IMAGE SNAPSHOTTER
    local rep=$1 img=$2 snap=$3 ref t s
    ref=$E2E_REGISTRY/$img:latest
    wait_clean

    t=$(now)
    ctr_ image pull --plain-http --snapshotter "$snap" "$ref" >"$ENV_DIR/pull.log" 2>&1 ||
        die "pull $ref ($snap): $(tail -n 20 "$ENV_DIR/pull.log")"
    s=$(since "$t")
    record "$img" "$snap" pull "$rep" "$s"
    log "rep $rep $img $snap: pull ${s}s"
    if [[ $snap == dedup ]]; then
        # Commit returns once the layer is usable and deletes the unpacked copy in the
        # background (ROOT/trash); let that finish so it is neither counted in the
        # next step nor in the disk use, and record how long it ran on.
        t=$(now)
        for _ in $(seq 600); do
            [[ -z "$(ls -A "$DEDUP_DIR/trash" 2>/dev/null)" ]] && break
            sleep 0.05
        done
        record "$img" "$snap" trash "$rep" "$(since "$t")"
    fi

    if [[ $img == minbase && $rep == 1 ]]; then
        local dir
        if [[ $snap == dedup ]]; then dir=$DEDUP_DIR; else dir=$OVL_DIR; fi
        sync
        record "$img" "$snap" du_bytes "$rep" "$(du -sxB1 "$dir" | cut -f1)"
    fi

    local id=b$rep-$img-$snap
    ctr_ run --rm --snapshotter "$snap" "$ref" "$id-w" /bin/true || die "ctr run $ref ($snap) failed"
    t=$(now)
    ctr_ run --rm --snapshotter "$snap" "$ref" "$id-t" /bin/true
    s=$(since "$t")
    record "$img" "$snap" run_true "$rep" "$s"

    sync
    echo 3 >/proc/sys/vm/drop_caches
    t=$(now)
    s=$(read_all "$snap" "$ref" "$id-c")
    record "$img" "$snap" read_cold_run "$rep" "$(since "$t")"
    record "$img" "$snap" read_cold "$rep" "$s"
    local w
    w=$(read_all "$snap" "$ref" "$id-h")
    record "$img" "$snap" read_warm "$rep" "$w"
    log "rep $rep $img $snap: read-all cold ${s}s warm ${w}s"

    remove_image "$ref"
}

for ((rep = 1; rep <= REPS; rep++)); do
    if ((rep % 2)); then order=(dedup overlayfs); else order=(overlayfs dedup); fi
    for img in minbase layered; do
        for snap in "${order[@]}"; do
            measure "$rep" "$img" "$snap"
        done
    done
done

python3 - "$BENCH_DIR" "$RAW" "$REPS" <<'PY'
import json, os, platform, statistics, subprocess, sys, time

out_dir, raw, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
samples = {}
for line in open(raw):
    img, snap, metric, rep, value = line.rstrip("\n").split("\t")
    samples.setdefault((img, metric, snap), []).append(float(value))

metrics = [("pull", "pull + unpack (ctr image pull)", 1.3),
           ("run_true", "ctr run --rm /bin/true (warm)", None),
           ("read_cold", "read every file, cold cache", 1.05),
           ("read_warm", "read every file, warm cache", 1.05),
           ("read_cold_run", "ctr run of the cold read, start-up included", None)]
rows = []
for img in ("minbase", "layered"):
    for m, desc, target in metrics:
        d = samples.get((img, m, "dedup"), [])
        o = samples.get((img, m, "overlayfs"), [])
        if not d or not o:
            continue
        md, mo = statistics.median(d), statistics.median(o)
        ratio = md / mo if mo > 0 else None
        rows.append({
            "image": img, "metric": m, "what": desc,
            "dedup_median_s": round(md, 4), "overlayfs_median_s": round(mo, 4),
            "dedup_samples_s": d, "overlayfs_samples_s": o,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "target_ratio_max": target,
            "meets_target": (ratio <= target) if (target is not None and ratio is not None) else None,
        })
du = {snap: int(samples[("minbase", "du_bytes", snap)][0])
      for snap in ("dedup", "overlayfs") if ("minbase", "du_bytes", snap) in samples}

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
    "read_all": "find / -xdev -type f -exec cat {} + >/dev/null, timed inside the container",
}
result = {"meta": meta, "rows": rows, "du_after_minbase_bytes": du}
with open(os.path.join(out_dir, "snapshotter.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

md = ["# dedup-snapshotter vs containerd overlayfs", "",
      f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, {meta['containerd']}; "
      f"median of {reps} run(s); same containerd, registry and images for both.", "",
      "| image | step | dedup s (min–max) | overlayfs s (min–max) | dedup/overlayfs | target | ok |",
      "|---|---|---:|---:|---:|---:|:---:|"]
def cell(med, xs):
    return f"{med:.3f} ({min(xs):.3f}–{max(xs):.3f})"
small = False
for r in rows:
    tgt = f"≤ {r['target_ratio_max']}" if r["target_ratio_max"] else ""
    ok = {True: "yes", False: "NO", None: ""}[r["meets_target"]]
    if r["target_ratio_max"] and max(r["dedup_median_s"], r["overlayfs_median_s"]) < 0.05:
        ok += " ¹"
        small = True
    md.append(f"| {r['image']} | {r['what']} | {cell(r['dedup_median_s'], r['dedup_samples_s'])} | "
              f"{cell(r['overlayfs_median_s'], r['overlayfs_samples_s'])} | {r['ratio']:.2f} | {tgt} | {ok} |")
if small:
    md += ["", "¹ a few milliseconds in all: the ratio is within the noise of one run."]
if du:
    md += ["", "Disk use after pulling minbase (`du -sx`, content store excluded):", ""]
    for snap, b in du.items():
        md.append(f"- {snap}: {b / 1e6:.1f} MB")
    if len(du) == 2 and du["overlayfs"]:
        md.append(f"- dedup/overlayfs: {du['dedup'] / du['overlayfs']:.2f}")
trash = samples.get(("minbase", "trash", "dedup"), [])
if trash:
    md += ["", f"After a dedup pull of minbase returned, the unpacked copy was deleted in the background within "
           f"{statistics.median(trash):.2f} s (median; not counted in the pull time above, and waited out before "
           f"the next step)."]
text = "\n".join(md) + "\n"
with open(os.path.join(out_dir, "snapshotter.md"), "w") as f:
    f.write(text)
print(text)
PY
log "results in $BENCH_DIR/snapshotter.{json,md}"
