#!/usr/bin/env bash
# The side-by-side benchmark on containerd 2.1 (issue 11): four ways to unpack and run the same images through the
# same containerd 2.1.9, from the same loopback registry, in one run.
#
#   sudo scripts/bench-containerd.sh [-n REPS]
#
# Modes (snapshotter + differ; the transfer service's unpack_config pairs them):
#   overlayfs      containerd's overlayfs snapshotter + its walking differ
#   erofs          containerd's in-tree erofs snapshotter + erofs differ, mkfs.erofs 1.9.4 (scripts/lib/erofs-utils.sh,
#                  first in containerd's PATH) with the documented
#                  `[plugins."io.containerd.differ.v1.erofs"] mkfs_options = ["-T0", "--mkfs-time", "--sort=none"]`
#   dedup          ours: `dedup-snapshotter serve` as proxy snapshotter `dedup` + proxy Diff `dedup-diff`
#   dedup-dedup    the same with `serve --dedup`
#   dedup-stream   (opt-in mode, not in the default list) `serve --stream-layers`: the snapshotter downloads each
#                  layer itself when the transfer service's Prepare names it and converts it as it arrives
# Every (round, mode) gets a FRESH environment: scripts/e2e-env.sh (E2E_CONTAINERD=2.1; its registry, containerd root
# and snapshotter root all new), started for that mode and stopped after it, so each mode starts from an empty
# containerd root and snapshotter.  The erofs pieces go in through E2E_CONTAINERD_EXTRA (appended to e2e-env's
# containerd.toml); the same extra config and PATH are given to every mode.  The order of the modes rotates between
# rounds.  Images (scripts/build-test-images.sh): `minbase` (debootstrap bookworm minbase, one ~93 MB gzip layer) and
# `layered` (busybox + 3 small layers with whiteouts and an opaque dir), each pulled into an empty store (minbase,
# then removed and the stores waited empty, then layered).  Measured per image:
#   pull        `ctr images pull --plain-http --snapshotter X` (the transfer service: fetch + unpack), wall time
#   du          `du -sxB1` of the snapshotter's root right after the pull (content store not counted; -x skips the
#               layer mounts). overlayfs/erofs: containerd's io.containerd.snapshotter.v1.<name>; ours: its --root
#   run_true    `ctr run --rm /bin/true`, warm (after one untimed run)
#   read_cold   every file read inside a container (`find / -xdev -type f -exec cat {} + >/dev/null`), page cache
#               dropped just before the `ctr run`, timed inside the container by bench-env.sh's static helper
#   read_warm   the same right after, cache warm
#   read_cold_run  (informational) the whole cold `ctr run`, start-up and teardown included
# Medians over REPS rounds (default 3, or BENCH_REPS); ratios against containerd's erofs.  Targets (issue 11):
#   pull dedup ≤ 0.5× erofs;  read_cold dedup ≤ 1.0× erofs on both images;  pull dedup-dedup ≤ 1.05× dedup.
# Results: BENCH_DIR/containerd.json and containerd.md (BENCH_DIR defaults to target/bench), raw samples in
# BENCH_DIR/containerd-raw.tsv.  Everything started is stopped and its directory removed on exit.
# Knobs: BENCH_MODES (default "overlayfs erofs dedup dedup-dedup"), BENCH_IMAGES (default "minbase layered"),
# BENCH_DEDUP_BIN (the daemon binary, default target/release/dedup-snapshotter: e.g. a build of another revision for
# an A/B), BENCH_NO_BUILD=1 (no cargo build).  Needs root, python3, rustc (the timing helper), and e2e-env.sh with
# E2E_CONTAINERD_EXTRA support.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

log() { echo "bench-containerd: $*" >&2; }
die() {
    log "$*"
    exit 1
}

MODES=${BENCH_MODES:-overlayfs erofs dedup dedup-dedup}
IMAGES=${BENCH_IMAGES:-minbase layered}
for m in $MODES; do
    case $m in overlayfs | erofs | dedup | dedup-dedup | dedup-stream) ;; *) die "BENCH_MODES: unknown mode $m" ;; esac
done
for i in $IMAGES; do
    case $i in minbase | layered | busybox | busybox-plus) ;; *) die "BENCH_IMAGES: unknown image $i" ;; esac
done

# shellcheck source=scripts/lib/bench-env.sh
. "$ROOT/scripts/lib/bench-env.sh"
bench_setup containerd-raw.tsv
DEDUP_BIN=${BENCH_DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
[[ -x "$DEDUP_BIN" ]] || die "$DEDUP_BIN missing"
if ! grep -q E2E_CONTAINERD_EXTRA "$ROOT/scripts/e2e-env.sh"; then
    [[ " $MODES " != *" erofs "* ]] ||
        die "scripts/e2e-env.sh has no E2E_CONTAINERD_EXTRA yet (the erofs mode's config goes in through it)"
    log "warning: scripts/e2e-env.sh ignores E2E_CONTAINERD_EXTRA (fine without the erofs mode)"
fi

# containerd 2.1.9 (cached) and erofs-utils 1.9.4 (cached build), both before anything is started
CTRD_BIN=$("$ROOT/scripts/lib/containerd-versions.sh" install 2.1) || die "cannot install containerd 2.1"
EROFS_BIN=$("$ROOT/scripts/lib/erofs-utils.sh" install) || die "cannot build erofs-utils 1.9.4"
MKFS_VERSION=$("$EROFS_BIN/mkfs.erofs" -V 2>&1 | head -n 1)
DEDUP_VERSION=$("$DEDUP_BIN" --version 2>/dev/null | head -n 1 || echo "?")
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# containerd inherits this PATH (e2e-env.sh only puts containerd's own bin dir before it): its erofs differ runs
# this mkfs.erofs
export PATH="$EROFS_BIN:$PATH"
export E2E_CONTAINERD=2.1

TOP=$(mktemp -d /tmp/bench-ctrd.XXXXXX)
RUN_DIR=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$RUN_DIR" && -f "$RUN_DIR/env" ]]; then
        if ((rc)) && [[ -d "$RUN_DIR/logs" ]]; then
            log "failed; last lines of the logs:"
            tail -n 20 "$RUN_DIR"/logs/*.log >&2 || true
        fi
        "$ROOT/scripts/e2e-env.sh" stop "$RUN_DIR" >"$TOP/stop.log" 2>&1 ||
            log "e2e-env.sh stop failed: $(cat "$TOP/stop.log")"
    fi
    if awk -v d="$TOP/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        log "still mounted under $TOP; kept"
    else
        rm -rf "$TOP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ENV_DIR=$TOP bench_timeit

# The extra containerd config (every mode gets it): the erofs differ's documented mkfs options, and the transfer
# service unpacking for the erofs snapshotter with the erofs differ.
cat >"$TOP/extra.toml" <<'TOML'

# bench-containerd.sh: containerd's in-tree erofs snapshotter + erofs differ (mkfs.erofs 1.9.4 first in PATH)
[plugins."io.containerd.differ.v1.erofs"]
  mkfs_options = ["-T0", "--mkfs-time", "--sort=none"]

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "erofs"
  differ = "erofs"
TOML
export E2E_CONTAINERD_EXTRA=$TOP/extra.toml

NS=bench
ctr_() { "$E2E_CTR" -a "$E2E_CONTAINERD_SOCK" -n "$NS" "$@"; }

: >"$RAW"
record() { # IMAGE MODE METRIC REP VALUE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RAW"
}

snap_of() { # MODE: the snapshotter name
    case $1 in overlayfs | erofs) echo "$1" ;; *) echo dedup ;; esac
}
snap_dir() { # MODE: the snapshotter's root
    case $1 in
    overlayfs | erofs) echo "$E2E_DIR/containerd/root/io.containerd.snapshotter.v1.$1" ;;
    *) echo "$E2E_SNAPSHOTTER_ROOT" ;;
    esac
}

wait_clean() { # MODE: nothing in the content store, no snapshots (nor snapshot dirs) in the mode's snapshotter
    local snap dir i
    snap=$(snap_of "$1")
    dir=$(snap_dir "$1")
    for ((i = 0; i < 300; i++)); do
        if [[ -z "$(ctr_ content ls -q)" && -z "$(snapshots_of "$snap")" && -z "$(dir_entries "$dir/snapshots")" ]]; then
            return 0
        fi
        if ((i == 50)); then
            local blobs
            blobs=$(ctr_ content ls -q)
            # shellcheck disable=SC2086
            [[ -z "$blobs" ]] || ctr_ content rm $blobs >/dev/null 2>&1 || true
        fi
        sleep 0.1
    done
    die "the stores did not empty: content [$(ctr_ content ls -q | tr '\n' ' ')]" \
        "$snap [$(snapshots_of "$snap" | tr '\n' ' ')] dirs [$(names_in "$dir/snapshots")]"
}

log_size() { wc -c <"$1"; }

# Checks the pull went the way the mode says (once per image and mode, first round): containerd's erofs differ ran
# mkfs.erofs 1.9.4, or our Apply converted every layer (and no Commit conversion).
check_path() { # MODE IMAGE CTRD_LOG_FROM SNAP_LOG_FROM
    local mode=$1 img=$2 clog snaplog n
    clog=$(tail -c +"$(($3 + 1))" "$E2E_DIR/logs/containerd.log")
    snaplog=$(tail -c +"$(($4 + 1))" "$E2E_DIR/logs/snapshotter.log" | sed 's/\x1b\[[0-9;]*m//g')
    case $mode in
    erofs)
        n=$(grep -c "running $EROFS_BIN/mkfs.erofs" <<<"$clog" || true)
        ((n > 0)) || die "$img (erofs): containerd's log shows no run of $EROFS_BIN/mkfs.erofs:"$'\n'"$(tail -n 20 <<<"$clog")"
        [[ -n "$(find "$(snap_dir erofs)/snapshots" -name layer.erofs -print -quit)" ]] ||
            die "$img (erofs): no layer.erofs under $(snap_dir erofs)/snapshots"
        log "$img (erofs): $n layer(s) through $EROFS_BIN/mkfs.erofs"
        ;;
    dedup-stream)
        n=$(grep -c 'streamed layer committed' <<<"$snaplog" || true)
        ((n > 0)) || die "$img ($mode): no streamed layer in the daemon's log:"$'\n'"$(tail -n 20 <<<"$snaplog")"
        log "$img ($mode): $n layer(s) streamed by the snapshotter"
        ;;
    dedup | dedup-dedup)
        n=$(grep 'rpc="Apply"' <<<"$snaplog" | grep -c 'ok=true' || true)
        ((n > 0)) || die "$img ($mode): no successful Apply in the daemon's log:"$'\n'"$(tail -n 20 <<<"$snaplog")"
        log "$img ($mode): $n layer(s) applied by our Diff service"
        ;;
    esac
}

measure() { # REP MODE IMAGE
    local rep=$1 mode=$2 img=$3 snap ref t s p w clog_from snaplog_from
    snap=$(snap_of "$mode")
    ref=$E2E_REGISTRY/$img:latest
    wait_clean "$mode"
    clog_from=$(log_size "$E2E_DIR/logs/containerd.log")
    snaplog_from=$(log_size "$E2E_DIR/logs/snapshotter.log")

    t=$(now)
    ctr_ images pull --plain-http --snapshotter "$snap" "$ref" >"$E2E_DIR/pull.log" 2>&1 ||
        die "pull $ref ($mode): $(tail -n 20 "$E2E_DIR/pull.log")"
    p=$(since "$t")
    record "$img" "$mode" pull "$rep" "$p"
    if [[ $snap == dedup ]]; then
        # an unpacked copy left by a Commit conversion is deleted in the background: wait it out (none expected:
        # our Apply writes layer.erofs directly)
        for _ in $(seq 600); do
            [[ -z "$(ls -A "$E2E_SNAPSHOTTER_ROOT/trash" 2>/dev/null)" ]] && break
            sleep 0.05
        done
    fi
    ((rep > 1)) || check_path "$mode" "$img" "$clog_from" "$snaplog_from"
    sync
    local du
    du=$(du -sxB1 "$(snap_dir "$mode")" | cut -f1)
    record "$img" "$mode" du_bytes "$rep" "$du"

    local id=b$rep-$img-$mode
    ctr_ run --rm --snapshotter "$snap" "$ref" "$id-w" /bin/true || die "ctr run $ref ($mode) failed"
    t=$(now)
    ctr_ run --rm --snapshotter "$snap" "$ref" "$id-t" /bin/true
    record "$img" "$mode" run_true "$rep" "$(since "$t")"

    sync
    echo 3 >/proc/sys/vm/drop_caches
    t=$(now)
    s=$(read_all "$snap" "$ref" "$id-c")
    record "$img" "$mode" read_cold_run "$rep" "$(since "$t")"
    record "$img" "$mode" read_cold "$rep" "$s"
    w=$(read_all "$snap" "$ref" "$id-h")
    record "$img" "$mode" read_warm "$rep" "$w"
    log "round $rep $img $mode: pull ${p}s, du $((du / 1000000)) MB, read-all cold ${s}s warm ${w}s"

    ctr_ image rm --sync "$ref" >/dev/null
    wait_clean "$mode"
}

start_env() { # REP MODE: a fresh e2e environment for MODE in RUN_DIR
    local rep=$1 mode=$2 cmd
    RUN_DIR=$TOP/r$rep-$mode
    cmd="$DEDUP_BIN serve --root {root} --address {socket}"
    [[ $mode != dedup-dedup ]] || cmd="$DEDUP_BIN serve --dedup --root {root} --address {socket}"
    [[ $mode != dedup-stream ]] || cmd="$DEDUP_BIN serve --stream-layers --root {root} --address {socket}"
    "$ROOT/scripts/e2e-env.sh" start "$RUN_DIR" "$cmd" >"$TOP/start.log" 2>&1 ||
        die "e2e-env.sh start ($mode): $(cat "$TOP/start.log")"
    # shellcheck disable=SC1091
    source "$RUN_DIR/env"
    [[ "$E2E_CONTAINERD_VERSION" == 2.1* ]] || die "e2e-env started containerd $E2E_CONTAINERD_VERSION, not 2.1"
    if [[ $mode == erofs ]]; then
        # the erofs plugins loaded (the snapshotter needs the kernel's erofs, the differ a mkfs.erofs on PATH)
        local plugins
        plugins=$("$E2E_CTR" -a "$E2E_CONTAINERD_SOCK" plugins ls)
        grep -Eq 'io\.containerd\.snapshotter\.v1 +erofs .* ok' <<<"$plugins" ||
            die "containerd's erofs snapshotter did not load:"$'\n'"$(grep erofs <<<"$plugins")"
        grep -Eq 'io\.containerd\.differ\.v1 +erofs .* ok' <<<"$plugins" ||
            die "containerd's erofs differ did not load:"$'\n'"$(grep erofs <<<"$plugins")"
    fi
}

stop_env() {
    "$ROOT/scripts/e2e-env.sh" stop "$RUN_DIR" >"$TOP/stop.log" 2>&1 || die "e2e-env.sh stop: $(cat "$TOP/stop.log")"
    rm -rf "$RUN_DIR"
    RUN_DIR=""
}

read -r -a mode_list <<<"$MODES"
log "containerd 2.1 ($CTRD_BIN), $MKFS_VERSION ($EROFS_BIN); modes: $MODES; images: $IMAGES; $REPS round(s)"
CTRD_VERSION=""
for ((rep = 1; rep <= REPS; rep++)); do
    n=${#mode_list[@]}
    for ((k = 0; k < n; k++)); do
        mode=${mode_list[$(((k + rep - 1) % n))]}
        start_env "$rep" "$mode"
        CTRD_VERSION=$E2E_CONTAINERD_VERSION
        for img in $IMAGES; do
            measure "$rep" "$mode" "$img"
        done
        stop_env
    done
done

python3 - "$BENCH_DIR" "$RAW" "$REPS" "$CTRD_VERSION" "$MKFS_VERSION" "$MODES" "$IMAGES" "$DEDUP_VERSION" \
    "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, os, platform, statistics, sys, time

out_dir, raw, reps, ctrd, mkfs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
modes, images, dedup_version, load_start, load_end = sys.argv[6].split(), sys.argv[7].split(), *sys.argv[8:11]
samples = {}
for line in open(raw):
    img, mode, metric, rep, value = line.rstrip("\n").split("\t")
    samples.setdefault((img, metric, mode), []).append(float(value))

label = {"overlayfs": "overlayfs", "erofs": "containerd erofs", "dedup": "dedup", "dedup-dedup": "dedup --dedup",
         "dedup-stream": "dedup --stream-layers"}
metrics = [("pull", "pull + unpack (ctr images pull, transfer service)"),
           ("run_true", "ctr run --rm /bin/true (warm)"),
           ("read_cold", "read every file, cold cache"),
           ("read_warm", "read every file, warm cache"),
           ("read_cold_run", "ctr run of the cold read, start-up included"),
           ("du_bytes", "disk use of the snapshotter root after the pull (bytes)")]
rows = []
for img in images:
    for m, desc in metrics:
        per = {mode: samples[(img, m, mode)] for mode in modes if (img, m, mode) in samples}
        if not per:
            continue
        med = {mode: statistics.median(xs) for mode, xs in per.items()}
        base = med.get("erofs")
        rows.append({
            "image": img, "metric": m, "what": desc,
            "median": {k: round(v, 4) for k, v in med.items()},
            "samples": per,
            "ratio_vs_erofs": {k: (round(v / base, 3) if base else None) for k, v in med.items()},
        })

def med(img, m, mode):
    xs = samples.get((img, m, mode))
    return statistics.median(xs) if xs else None

targets = []
def target(name, num, den, limit):
    if num is None or den is None or den <= 0:
        return
    r = num / den
    targets.append({"target": name, "ratio": round(r, 3), "max": limit, "ok": r <= limit})
if "minbase" in images:
    target("pull minbase: dedup / containerd erofs", med("minbase", "pull", "dedup"), med("minbase", "pull", "erofs"), 0.5)
    target("pull minbase: dedup --stream-layers / containerd erofs", med("minbase", "pull", "dedup-stream"),
           med("minbase", "pull", "erofs"), 0.5)
for img in images:
    target(f"read-all cold {img}: dedup / containerd erofs", med(img, "read_cold", "dedup"), med(img, "read_cold", "erofs"), 1.0)
for img in images:
    target(f"pull {img}: dedup --dedup / dedup", med(img, "pull", "dedup-dedup"), med(img, "pull", "dedup"), 1.05)

meta = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "reps": reps,
    "kernel": platform.release(),
    "cpus": os.cpu_count(),
    "containerd": ctrd,
    "mkfs_erofs": mkfs,
    "dedup_snapshotter": dedup_version,
    "loadavg_start_end": [load_start, load_end],
    "erofs_mkfs_options": ["-T0", "--mkfs-time", "--sort=none"],
    "modes": modes,
    "read_all": "find / -xdev -type f -exec cat {} + >/dev/null, timed inside the container",
    "fresh_env": "each (round, mode) in a fresh scripts/e2e-env.sh environment (new containerd root, registry, snapshotter root)",
}
with open(os.path.join(out_dir, "containerd.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows, "targets": targets}, f, indent=2)
    f.write("\n")

md = ["# containerd 2.1: overlayfs, containerd's erofs, dedup-snapshotter", "",
      f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, containerd {ctrd}, {mkfs} "
      f"(erofs differ mkfs_options {' '.join(meta['erofs_mkfs_options'])}); median (min–max) of {reps} round(s), "
      f"each mode in a fresh containerd root per round; same registry and images; {dedup_version}; "
      f"load average {load_start} at the start, {load_end} at the end.", ""]
hdr = "| image | step | " + " | ".join(f"{label[m]}" for m in modes) + " | " + \
      " | ".join(f"{label[m]} / erofs" for m in modes if m != "erofs") + " |"
md += [hdr, "|---|---|" + "---:|" * (len(modes) + len([m for m in modes if m != "erofs"]))]
for r in rows:
    is_du = r["metric"] == "du_bytes"
    cells = []
    for m in modes:
        if m not in r["median"]:
            cells.append("")
        elif is_du:
            cells.append(f"{r['median'][m] / 1e6:.1f} MB")
        else:
            xs = r["samples"][m]
            cells.append(f"{r['median'][m]:.3f} ({min(xs):.3f}–{max(xs):.3f})")
    ratios = []
    for m in modes:
        if m == "erofs":
            continue
        x = r["ratio_vs_erofs"].get(m)
        ratios.append(f"{x:.2f}" if x is not None else "")
    what = "disk use after the pull" if is_du else r["what"]
    md.append(f"| {r['image']} | {what} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
if targets:
    md += ["", "Targets (issue 11):", "", "| target | ratio | max | ok |", "|---|---:|---:|:---:|"]
    for t in targets:
        md.append(f"| {t['target']} | {t['ratio']:.2f} | {t['max']} | {'yes' if t['ok'] else 'NO'} |")
text = "\n".join(md) + "\n"
with open(os.path.join(out_dir, "containerd.md"), "w") as f:
    f.write(text)
print(text)
PY
log "results in $BENCH_DIR/containerd.{json,md}"
