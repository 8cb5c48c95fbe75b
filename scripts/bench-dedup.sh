#!/usr/bin/env bash
# The dedup benchmark (issue 6): bytes on disk, pull (conversion) time and read-all speed for a family of 10 image
# versions, pulled through containerd's built-in overlayfs snapshotter, our daemon without dedup and our daemon with
# --dedup (and, on request, both again with --compression), in one run, through the same containerd 1.6, the same
# loopback registry and the same images.
#
#   sudo scripts/bench-dedup.sh [-n REPS] [--modes overlayfs,erofs,dedup,zerofs,zdedup] [--families flat,layered]
#
# Images (scripts/build-family.sh, cached): Debian bookworm minbase (v1, 120 MB) growing by apt-get installs and one
# upgrade to v10 (341 MB, 13,101 files), as `flat` (each version one layer holding its whole rootfs: 2.2 GB for the
# ten) and `layered` (vK = vK-1's layers + a diff layer), pushed to the registry as family-{flat,layered}:v1..v10.
# The environment is scripts/e2e-env.sh's (one containerd, one registry, our daemon), started once; our daemon runs
# from a copy of the binary (DEDUP_BIN, default target/release/dedup-snapshotter) through a wrapper that adds
# `--dedup` (and `--chunk-size $BENCH_CHUNK_SIZE` when set) in the dedup and zdedup modes and
# `--compression $BENCH_COMPRESSION` in the zerofs and zdedup modes.
# Modes (--modes or BENCH_MODES; default overlayfs,erofs,dedup):
#   overlayfs  containerd's own snapshotter (`--snapshotter overlayfs`)
#   erofs      our daemon, `serve` without --dedup (`--snapshotter dedup`)
#   dedup      our daemon, `serve --dedup`
#   zerofs     our daemon, `serve --compression $BENCH_COMPRESSION` (default lz4hc)
#   zdedup     our daemon, `serve --dedup --compression $BENCH_COMPRESSION`: files of at least one chunk stay shared,
#              uncompressed chunks, smaller files are compressed into the layer image
# "Our modes" below are erofs, dedup, zerofs and zdedup.
# For each repetition (the order of the modes rotates between repetitions), mode and family (--families or
# BENCH_FAMILIES), from empty stores (for our modes the daemon is restarted on a fresh, empty root):
#   pull       `ctr image pull --plain-http --snapshotter X` of v1, v2, ... v10 in turn, wall time of each and the total
#              (download from the loopback registry + unpack + EROFS conversion at Commit for our modes), one after
#              the other as a user's burst of pulls.  For our modes the deferred deletion of the unpacked copies
#              (ROOT/trash, once the daemon is idle) is waited out after the 10 pulls, timed apart, not counted.
#   bytes      then `du -sx --block-size=1` of the snapshotter's root: containerd's
#              io.containerd.snapshotter.v1.overlayfs dir, or our daemon's root (its mounts are other filesystems,
#              so -x skips them).  The content store holds the same blobs in every mode and is not counted (reported
#              apart).
#   read_cold  reading every file of v10 inside a container (`find / -xdev -type f -exec cat {} + >/dev/null` with the
#              image's own find and cat), page cache dropped just before the `ctr run`; timed inside the container
#              by a tiny static helper bind-mounted at /.bench-timeit (as in scripts/bench-snapshotter.sh).
#   read_warm  the same right after, cache warm.
#   stats      for our modes, the daemon is then stopped and `dedup-snapshotter stats --root ROOT --json` recorded
#              (logical_bytes, stored_bytes, chunks, index_bytes, blobs); a binary without the command records null.
#              The daemon is started again on the same root and the images removed (`ctr image rm --sync`) until
#              content store and snapshotters are empty.
# Report: medians over REPS (default 3, or BENCH_REPS): bytes per mode and family with dedup/overlayfs and
# erofs/overlayfs, total pull time with dedup/erofs, read-all with dedup/erofs; with the compressed modes also
# zerofs/erofs, zdedup/dedup and zdedup/erofs of bytes, pull total and read-all.  Targets (the issue):
#   bytes      dedup/overlayfs ≤ 0.50 on the flat family
#   pull       dedup/erofs time ≤ 1.2 (total of the 10 pulls)
#   read-all   dedup ≥ 0.9× the speed of erofs (non-dedup layers), i.e. time ratio ≤ 1.11 (cold and warm)
# Results: BENCH_DIR/dedup.json and dedup.md (BENCH_DIR defaults to target/bench), raw samples in
# BENCH_DIR/dedup-raw.tsv.  Everything the script starts is stopped and its directory removed on exit.
# BENCH_NO_BUILD=1 skips `cargo build --release` of the daemon.  One repetition of the three default modes takes about
# 6 minutes on 2 cores (-n 3 of overlayfs and erofs: 12 minutes); the family build, once, about 5 more.  The machine's
# CPUs are shared: the pulls are CPU-bound (gunzip, unpack, conversion), so compare modes within one run only.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { echo "bench-dedup: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# --modes / --families (before the shared options, which getopts would refuse)
MODES=${BENCH_MODES:-overlayfs,erofs,dedup}
FAMS=${BENCH_FAMILIES:-flat,layered}
args=()
while (($#)); do
    case $1 in
    --modes) MODES=${2:?--modes wants a list}; shift 2 ;;
    --modes=*) MODES=${1#--modes=}; shift ;;
    --families) FAMS=${2:?--families wants a list}; shift 2 ;;
    --families=*) FAMS=${1#--families=}; shift ;;
    *) args+=("$1"); shift ;;
    esac
done
set -- "${args[@]+"${args[@]}"}"
# -n REPS, -h (shared with the other bench scripts)
# shellcheck source=scripts/lib/bench-args.sh
. "$ROOT/scripts/lib/bench-args.sh"

IFS=, read -r -a MODE_LIST <<<"$MODES"
IFS=, read -r -a FAM_LIST <<<"$FAMS"
((${#MODE_LIST[@]})) || die "no modes"
for m in "${MODE_LIST[@]}"; do
    [[ $m == overlayfs || $m == erofs || $m == dedup || $m == zerofs || $m == zdedup ]] ||
        die "unknown mode $m (overlayfs, erofs, dedup, zerofs, zdedup)"
done
for f in "${FAM_LIST[@]}"; do
    [[ $f == flat || $f == layered ]] || die "unknown family $f (flat, layered)"
done
[[ -z "${BENCH_CHUNK_SIZE:-}" || $BENCH_CHUNK_SIZE =~ ^[1-9][0-9]*$ ]] || die "BENCH_CHUNK_SIZE wants a number"
COMPRESSION=${BENCH_COMPRESSION:-lz4hc}
[[ $COMPRESSION =~ ^[a-z0-9]+(,[0-9]+)?$ ]] || die "BENCH_COMPRESSION wants ALGO[,LEVEL], e.g. lz4hc or zstd,3"

# shellcheck source=scripts/lib/bench-env.sh
. "$ROOT/scripts/lib/bench-env.sh"
bench_setup dedup-raw.tsv
SRC_BIN=${DEDUP_BIN:-$ROOT/target/release/dedup-snapshotter}
[[ -x "$SRC_BIN" ]] || die "$SRC_BIN missing"

# The family (built once, cached; about 5 minutes the first time).
FAMILY_DIR=$("$ROOT/scripts/build-family.sh" build) || die "scripts/build-family.sh failed"

ENV_DIR=$(mktemp -d /tmp/bench-dedup.XXXXXX)
bench_env_trap

# Our daemon: a private copy of the binary (a rebuild during the run does not change it) behind a wrapper that
# picks the flags of the current mode from ENV_DIR/mode.
mkdir -p "$ENV_DIR/bin"
cp "$SRC_BIN" "$ENV_DIR/bin/dedup-snapshotter"
BIN=$ENV_DIR/bin/dedup-snapshotter
serve_help=$("$BIN" serve --help 2>&1 || true)
if [[ (",$MODES," == *,dedup,* || ",$MODES," == *,zdedup,*) && $serve_help != *--dedup* ]]; then
    die "$SRC_BIN has no \`serve --dedup\` yet: leave the dedup modes out (--modes overlayfs,erofs)"
fi
if [[ (",$MODES," == *,zerofs,* || ",$MODES," == *,zdedup,*) && $serve_help != *--compression* ]]; then
    die "$SRC_BIN has no \`serve --compression\` yet: leave the zerofs and zdedup modes out"
fi
echo erofs >"$ENV_DIR/mode"
cat >"$ENV_DIR/bin/serve" <<SH
#!/bin/sh
case "\$(cat '$ENV_DIR/mode')" in
dedup) exec '$BIN' serve --dedup ${BENCH_CHUNK_SIZE:+--chunk-size $BENCH_CHUNK_SIZE} "\$@" ;;
zerofs) exec '$BIN' serve --compression '$COMPRESSION' "\$@" ;;
zdedup) exec '$BIN' serve --dedup ${BENCH_CHUNK_SIZE:+--chunk-size $BENCH_CHUNK_SIZE} --compression '$COMPRESSION' "\$@" ;;
esac
exec '$BIN' serve "\$@"
SH
chmod 0755 "$ENV_DIR/bin/serve"

bench_timeit

log "starting the environment in $ENV_DIR"
"$ROOT/scripts/e2e-env.sh" start "$ENV_DIR" "$ENV_DIR/bin/serve --root {root} --address {socket}" \
    >"$ENV_DIR/start.log" 2>&1 || die "e2e-env.sh start: $(cat "$ENV_DIR/start.log")"
# shellcheck disable=SC1091
source "$ENV_DIR/env"
NS=bench
OVL_DIR=$ENV_DIR/containerd/root/io.containerd.snapshotter.v1.overlayfs
CONTENT_DIR=$ENV_DIR/containerd/root/io.containerd.content.v1.content
DEDUP_DIR=$E2E_SNAPSHOTTER_ROOT

log "pushing the family to $E2E_REGISTRY"
"$ROOT/scripts/build-family.sh" push "$E2E_REGISTRY" || die "push of the family failed"
NVERSIONS=$(($(wc -l <"$FAMILY_DIR/sizes.tsv") - 1))

ctr_() { ctr -a "$E2E_CONTAINERD_SOCK" -n "$NS" "$@"; }


: >"$RAW"
record() { # FAMILY MODE METRIC REP VALUE [VERSION]
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$RAW"
}


wait_clean() { # nothing in the content store, no snapshots in either snapshotter (nor their dirs)
    local i
    for ((i = 0; i < 600; i++)); do
        if [[ -z "$(ctr_ content ls -q)" && -z "$(snapshots_of dedup)" && -z "$(snapshots_of overlayfs)" &&
            -z "$(dir_entries "$DEDUP_DIR/snapshots")" && -z "$(dir_entries "$OVL_DIR/snapshots")" ]]; then
            return 0
        fi
        if ((i == 100)); then
            # Whatever GC left: remove content blobs explicitly.
            local blobs
            blobs=$(ctr_ content ls -q)
            # shellcheck disable=SC2086
            [[ -z "$blobs" ]] || ctr_ content rm $blobs >/dev/null 2>&1 || true
        fi
        if ((i % 100 == 50)) && [[ -z "$(snapshots_of dedup)" && -n "$(dir_entries "$DEDUP_DIR/snapshots")" ]]; then
            # containerd forgot our snapshots but a failed garbage collection left them in the daemon: removing a
            # snapshot marks the snapshotter for the collector again, which then removes every orphan.
            local key=bench-gc-$RANDOM
            if ctr_ snapshots --snapshotter dedup prepare "$key" >/dev/null 2>&1; then
                ctr_ snapshots --snapshotter dedup rm "$key" >/dev/null 2>&1 || true
            fi
        fi
        sleep 0.1
    done
    die "the stores did not empty: content [$(ctr_ content ls -q | tr '\n' ' ')]" \
        "dedup [$(snapshots_of dedup | tr '\n' ' ')] overlayfs [$(snapshots_of overlayfs | tr '\n' ' ')]" \
        "dedup dirs [$(names_in "$DEDUP_DIR/snapshots")]" \
        "overlayfs dirs [$(names_in "$OVL_DIR/snapshots")]"
}

wait_trash() { # our daemon deletes the unpacked copy of a committed layer in the background: let it finish
    local i
    for ((i = 0; i < 6000; i++)); do
        [[ -z "$(ls -A "$DEDUP_DIR/trash" 2>/dev/null)" ]] && return 0
        sleep 0.05
    done
    die "$DEDUP_DIR/trash did not empty"
}

alive() { # PID: running and not a zombie
    local st
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ "${st:0:1}" != Z ]]
}

stop_daemon() { # SIGTERM our daemon (by the pid e2e-env.sh recorded) and wait until it is gone
    local i pid=$E2E_SNAPSHOTTER_PID
    alive "$pid" || return 0
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "daemon (pid $pid) ignored SIGTERM for 30 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || return 0; sleep 0.1; done
    die "daemon (pid $pid) does not exit"
}

start_daemon() { # on the current root, with the flags of ENV_DIR/mode
    local i key
    "$ROOT/scripts/e2e-env.sh" restart-snapshotter "$ENV_DIR" >>"$ENV_DIR/restart.log" 2>&1 ||
        die "daemon ($(cat "$ENV_DIR/mode") mode) did not start: $(tail -n 5 "$ENV_DIR/restart.log")" \
            "$(tail -n 20 "$ENV_DIR/logs/snapshotter.log")"
    # shellcheck disable=SC1091
    source "$ENV_DIR/env"
    # containerd's connection to the proxy failed while the daemon was down and may sit in gRPC's reconnect
    # backoff, failing calls fast (a pull, or the garbage collector removing our snapshots, which it would not
    # retry): go on only once a call that reaches the daemon succeeds (`ctr snapshots ls` answers from containerd's
    # own metadata, a Prepare does not).
    key=bench-probe-$RANDOM
    for ((i = 0; i < 600; i++)); do
        if ctr_ snapshots --snapshotter dedup prepare "$key" >/dev/null 2>&1; then
            ctr_ snapshots --snapshotter dedup rm "$key" >/dev/null
            return 0
        fi
        sleep 0.1
    done
    die "containerd cannot reach the restarted daemon: $(ctr_ snapshots --snapshotter dedup prepare "$key" 2>&1)"
}

settle() { # wait until our daemon holds exactly the snapshots containerd knows of (containers' snapshots removed)
    local i n
    for ((i = 0; i < 600; i++)); do
        n=$(snapshots_of dedup | wc -l)
        [[ $(find "$DEDUP_DIR/snapshots" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) -eq $n ]] && return 0
        sleep 0.1
    done
    die "our daemon's snapshots [$(names_in "$DEDUP_DIR/snapshots")] do not match" \
        "containerd's [$(snapshots_of dedup | tr '\n' ' ')]"
}

mounts_under() { # DIR: mount points under DIR, deepest first
    awk -v d="$1/" '{ p = $5; gsub(/\\040/, " ", p); gsub(/\\011/, "\t", p); gsub(/\\134/, "\\", p);
        if (index(p, d) == 1) print length(p) "\t" p }' /proc/self/mountinfo | sort -t$'\t' -k1,1nr | cut -f2-
}

fresh_daemon() { # MODE: our daemon on a fresh, empty root in MODE (the stores must be empty: wait_clean first)
    local m
    stop_daemon
    while IFS= read -r m; do
        [[ -n "$m" ]] && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done < <(mounts_under "$DEDUP_DIR")
    [[ -z "$(mounts_under "$DEDUP_DIR")" ]] || die "still mounted under $DEDUP_DIR"
    rm -rf --one-file-system "$DEDUP_DIR"
    mkdir -p "$DEDUP_DIR"
    echo "$1" >"$ENV_DIR/mode"
    start_daemon
}

stats_json() { # our daemon stopped: prints `stats --root --json` as one compact JSON line, or nothing
    local out
    if out=$("$BIN" stats --root "$DEDUP_DIR" --json 2>"$ENV_DIR/stats.err") &&
        out=$(python3 -c 'import json, sys; print(json.dumps(json.loads(sys.stdin.read()), separators=(",", ":")))' \
            <<<"$out" 2>>"$ENV_DIR/stats.err"); then
        echo "$out"
    else
        log "stats --json unavailable: $(head -c 300 "$ENV_DIR/stats.err" | tr '\n' ' ')"
    fi
}


measure() { # REP MODE FAMILY
    local rep=$1 mode=$2 fam=$3 snap=dedup dir=$DEDUP_DIR ref k t s total=0 trash=0 refs=()
    if [[ $mode == overlayfs ]]; then snap=overlayfs dir=$OVL_DIR; fi
    wait_clean
    if [[ $mode != overlayfs ]]; then fresh_daemon "$mode"; fi

    for ((k = 1; k <= NVERSIONS; k++)); do
        ref=$E2E_REGISTRY/family-$fam:v$k
        refs+=("$ref")
        t=$(now)
        ctr_ image pull --plain-http --snapshotter "$snap" "$ref" >"$ENV_DIR/pull.log" 2>&1 ||
            die "pull $ref ($mode): $(tail -n 20 "$ENV_DIR/pull.log")"
        s=$(since "$t")
        record "$fam" "$mode" pull "$rep" "$s" "v$k"
        total=$(awk -v a="$total" -v b="$s" 'BEGIN { printf "%.4f", a + b }')
    done
    record "$fam" "$mode" pull_total "$rep" "$total"
    if [[ $mode != overlayfs ]]; then
        # The daemon deletes the unpacked copies once it has been idle for a while (trash_idle_secs, default
        # 10 s): wait for that before measuring the disk, timed apart.
        t=$(now)
        wait_trash
        trash=$(since "$t")
    fi
    [[ $mode == overlayfs ]] || record "$fam" "$mode" trash_total "$rep" "$trash"
    sync
    local bytes content
    bytes=$(du -sx --block-size=1 "$dir" | cut -f1)
    content=$(du -sx --block-size=1 "$CONTENT_DIR" | cut -f1)
    record "$fam" "$mode" du_bytes "$rep" "$bytes"
    record "$fam" "$mode" content_bytes "$rep" "$content"
    log "rep $rep $fam $mode: pulled v1..v$NVERSIONS in ${total}s;" \
        "$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }') MB on disk"

    ref=${refs[-1]}
    local id=b$rep-$fam-$mode c w
    ctr_ run --rm --snapshotter "$snap" "$ref" "$id-w" /bin/true || die "ctr run $ref ($mode) failed"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t=$(now)
    c=$(read_all "$snap" "$ref" "$id-c")
    record "$fam" "$mode" read_cold_run "$rep" "$(since "$t")"
    record "$fam" "$mode" read_cold "$rep" "$c"
    w=$(read_all "$snap" "$ref" "$id-h")
    record "$fam" "$mode" read_warm "$rep" "$w"
    log "rep $rep $fam $mode: read-all v$NVERSIONS cold ${c}s warm ${w}s"

    if [[ $mode != overlayfs ]]; then
        local js
        settle
        wait_trash
        stop_daemon
        js=$(stats_json)
        [[ -z "$js" ]] || record "$fam" "$mode" stats "$rep" "$js"
        start_daemon
    fi

    ctr_ image rm --sync "${refs[@]}" >/dev/null
    wait_clean
}

for ((rep = 1; rep <= REPS; rep++)); do
    # rotate the order of the modes between repetitions
    n=${#MODE_LIST[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${MODE_LIST[$(((i + rep - 1) % n))]}"); done
    for mode in "${order[@]}"; do
        for fam in "${FAM_LIST[@]}"; do
            measure "$rep" "$mode" "$fam"
        done
    done
done

python3 - "$BENCH_DIR" "$RAW" "$REPS" "$FAMILY_DIR/sizes.tsv" "$MODES" "${BENCH_CHUNK_SIZE:-}" "$COMPRESSION" <<'PY'
import json, os, platform, statistics, subprocess, sys, time

out_dir, raw, reps, sizes_tsv, modes_arg, chunk, compression = sys.argv[1:8]
reps = int(reps)
samples, stats = {}, {}
for line in open(raw):
    fam, mode, metric, rep, value, version = line.rstrip("\n").split("\t")
    if metric == "stats":
        stats.setdefault((fam, mode), []).append(json.loads(value))
        continue
    key = (fam, mode, metric, version) if version else (fam, mode, metric)
    samples.setdefault(key, []).append(float(value))

MODES = ["overlayfs", "erofs", "dedup", "zerofs", "zdedup"]
FAMS = [f for f in ("flat", "layered") if any(k[0] == f for k in samples)]
# the modes measured (in any family), in MODES' order: the tables' columns
PRESENT = [m for m in MODES if any(k[1] == m and k[2] == "du_bytes" for k in samples)]
ZMODES = any(m in PRESENT for m in ("zerofs", "zdedup"))
def med(*key):
    xs = samples.get(tuple(key))
    return statistics.median(xs) if xs else None
def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None

with open(sizes_tsv) as f:
    head = f.readline().rstrip("\n").split("\t")
    family = [dict(zip(head, l.rstrip("\n").split("\t"))) for l in f if l.strip()]
for v in family:
    for k in list(v):
        if k != "version":
            v[k] = int(v[k])
nvers = len(family)

result = {"meta": {}, "family": family, "families": {}}
for fam in FAMS:
    r = {"bytes": {}, "content_store_bytes": None, "pull_total_s": {}, "pull_s": {}, "trash_total_s": {},
         "read_cold_s": {}, "read_warm_s": {}, "read_cold_run_s": {}, "stats": {}}
    for m in MODES:
        b = med(fam, m, "du_bytes")
        if b is None:
            continue
        r["bytes"][m] = int(b)
        r["content_store_bytes"] = int(med(fam, m, "content_bytes"))
        r["pull_total_s"][m] = round(med(fam, m, "pull_total"), 3)
        r["pull_s"][m] = {f"v{k}": round(med(fam, m, "pull", f"v{k}"), 3) for k in range(1, nvers + 1)
                          if med(fam, m, "pull", f"v{k}") is not None}
        if med(fam, m, "trash_total") is not None:
            r["trash_total_s"][m] = round(med(fam, m, "trash_total"), 3)
        for met in ("read_cold", "read_warm", "read_cold_run"):
            r[f"{met}_s"][m] = round(med(fam, m, met), 4)
        if m != "overlayfs":
            r["stats"][m] = stats.get((fam, m), [None])[0]
    B, P = r["bytes"], r["pull_total_s"]
    r["ratios"] = {
        "bytes_dedup_over_overlayfs": ratio(B.get("dedup"), B.get("overlayfs")),
        "bytes_erofs_over_overlayfs": ratio(B.get("erofs"), B.get("overlayfs")),
        "bytes_dedup_over_erofs": ratio(B.get("dedup"), B.get("erofs")),
        "pull_dedup_over_erofs": ratio(P.get("dedup"), P.get("erofs")),
        "pull_erofs_over_overlayfs": ratio(P.get("erofs"), P.get("overlayfs")),
        "read_cold_dedup_over_erofs": ratio(r["read_cold_s"].get("dedup"), r["read_cold_s"].get("erofs")),
        "read_warm_dedup_over_erofs": ratio(r["read_warm_s"].get("dedup"), r["read_warm_s"].get("erofs")),
        "read_cold_erofs_over_overlayfs": ratio(r["read_cold_s"].get("erofs"), r["read_cold_s"].get("overlayfs")),
        "read_warm_erofs_over_overlayfs": ratio(r["read_warm_s"].get("erofs"), r["read_warm_s"].get("overlayfs")),
    }
    # the compressed modes against their uncompressed counterparts (and zdedup against plain erofs)
    for a, b in (("zerofs", "erofs"), ("zdedup", "dedup"), ("zdedup", "erofs")):
        r["ratios"][f"bytes_{a}_over_{b}"] = ratio(B.get(a), B.get(b))
        r["ratios"][f"pull_{a}_over_{b}"] = ratio(P.get(a), P.get(b))
        for c in ("cold", "warm"):
            r["ratios"][f"read_{c}_{a}_over_{b}"] = ratio(r[f"read_{c}_s"].get(a), r[f"read_{c}_s"].get(b))
    t = r["ratios"]
    r["targets"] = {
        "bytes_dedup_over_overlayfs_max": 0.5 if fam == "flat" else None,
        "pull_dedup_over_erofs_max": 1.2,
        "read_dedup_over_erofs_max": round(1 / 0.9, 3),
    }
    def ok(v, lim):
        return None if v is None or lim is None else v <= lim
    r["meets_target"] = {
        "bytes": ok(t["bytes_dedup_over_overlayfs"], r["targets"]["bytes_dedup_over_overlayfs_max"]),
        "pull": ok(t["pull_dedup_over_erofs"], 1.2),
        "read_cold": ok(t["read_cold_dedup_over_erofs"], 1 / 0.9),
        "read_warm": ok(t["read_warm_dedup_over_erofs"], 1 / 0.9),
    }
    result["families"][fam] = r

def ver(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"
meta = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": reps, "kernel": platform.release(),
    "cpus": os.cpu_count(), "containerd": ver(["containerd", "--version"]), "modes": modes_arg,
    "chunk_size": int(chunk) if chunk else None,
    "compression": compression if ZMODES else None,
    "bytes": "du -sx --block-size=1 of the snapshotter root after pulling v1..v%d (content store not counted)" % nvers,
    "read_all": "find / -xdev -type f -exec cat {} + >/dev/null in v%d, timed inside the container" % nvers,
}
result["meta"] = meta
with open(os.path.join(out_dir, "dedup.json"), "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

MB = lambda b: "—" if b is None else f"{b / 1e6:,.1f}"
S = lambda s: "—" if s is None else f"{s:.2f}"
RT = lambda x: "—" if x is None else f"{x:.2f}"
OK = lambda v: {True: "yes", False: "NO", None: ""}[v]
last = family[-1]
ZPAIRS = [(a, b) for a, b in (("zerofs", "erofs"), ("zdedup", "dedup"), ("zdedup", "erofs"))
          if a in PRESENT and b in PRESENT]
ZH = "".join(f" {a}/{b} |" for a, b in ZPAIRS)
ZS = "---:|" * len(ZPAIRS)
def zcols(t, metric):
    return "".join(f" {RT(t[f'{metric}_{a}_over_{b}'])} |" for a, b in ZPAIRS)
def mcols(d, f):
    return "".join(f" {f(d.get(m))} |" for m in PRESENT)
mh = lambda unit: "".join(f" {m} {unit} |" for m in PRESENT)
ms = "---:|" * len(PRESENT)
md = ["# Dedup: the image family through overlayfs, erofs and erofs + dedup"
      + (" (and both compressed)" if ZMODES else ""), "",
      f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, {meta['containerd']}; median of {reps} run(s); "
      f"modes {modes_arg}" + (f", chunk size {chunk}" if chunk else "")
      + (f", compression {compression} (zerofs, zdedup)" if ZMODES else "") + ".", "",
      f"Family (scripts/build-family.sh): {nvers} versions, v1 {family[0]['rootfs_bytes'] / 1e6:.0f} MB → "
      f"v{nvers} {last['rootfs_bytes'] / 1e6:.0f} MB ({last['rootfs_files']} files); flat: "
      f"{sum(v['flat_layer_gz'] for v in family) / 1e6:.0f} MB of gzip layers for the {nvers} images, layered: "
      f"{last['layered_total_gz'] / 1e6:.0f} MB.", "",
      "## Bytes on disk after pulling all versions", "",
      "`du -sx --block-size=1` of the snapshotter's root, content store not counted.", "",
      "| family |" + mh("MB") + " erofs/overlayfs | dedup/overlayfs | target | ok | dedup/erofs |" + ZH,
      "|---|" + ms + "---:|---:|---:|:---:|---:|" + ZS]
for fam, r in result["families"].items():
    B, t = r["bytes"], r["ratios"]
    tgt = r["targets"]["bytes_dedup_over_overlayfs_max"]
    md.append(f"| {fam} |" + mcols(B, MB) + f" "
              f"{RT(t['bytes_erofs_over_overlayfs'])} | {RT(t['bytes_dedup_over_overlayfs'])} | "
              f"{'≤ %.2f' % tgt if tgt else ''} | {OK(r['meets_target']['bytes'])} | "
              f"{RT(t['bytes_dedup_over_erofs'])} |" + zcols(t, "bytes"))
md += ["", "Content store (the same blobs in every mode): " +
       ", ".join(f"{fam} {MB(r['content_store_bytes'])} MB" for fam, r in result["families"].items()) + ".", "",
       "## Pull (download + unpack + conversion), total of the %d pulls" % nvers, "",
       "| family |" + mh("s") + " erofs/overlayfs | dedup/erofs | target | ok |" + ZH,
       "|---|" + ms + "---:|---:|---:|:---:|" + ZS]
for fam, r in result["families"].items():
    P, t = r["pull_total_s"], r["ratios"]
    md.append(f"| {fam} |" + mcols(P, S) + f" "
              f"{RT(t['pull_erofs_over_overlayfs'])} | {RT(t['pull_dedup_over_erofs'])} | ≤ 1.2 | "
              f"{OK(r['meets_target']['pull'])} |" + zcols(t, "pull"))
trash = [(fam, m, s) for fam, r in result["families"].items() for m, s in r["trash_total_s"].items()]
if trash:
    md += ["", "Deferred deletion of the unpacked copies once the daemon was idle (waited out after the 10 pulls, "
           "not counted above): " + ", ".join(f"{fam} {m} {s:.1f} s" for fam, m, s in trash) + "."]
md += ["", "## Read every file of v%d" % nvers, "",
       "| family | cache |" + mh("s") + " erofs/overlayfs | dedup/erofs | target | ok |" + ZH,
       "|---|---|" + ms + "---:|---:|---:|:---:|" + ZS]
for fam, r in result["families"].items():
    for c in ("cold", "warm"):
        R, t = r[f"read_{c}_s"], r["ratios"]
        md.append(f"| {fam} | {c} |" + mcols(R, S) + f" "
                  f"{RT(t[f'read_{c}_erofs_over_overlayfs'])} | {RT(t[f'read_{c}_dedup_over_erofs'])} | ≤ 1.11 | "
                  f"{OK(r['meets_target'][f'read_{c}'])} |" + zcols(t, f"read_{c}"))
st = [(fam, m, s) for fam, r in result["families"].items() for m, s in r["stats"].items()]
if st:
    md += ["", "## `dedup-snapshotter stats --json` (daemon stopped, all versions pulled)", "",
           "| family | mode | logical MB | stored MB | stored/logical | chunks | index MB | blobs |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for fam, m, s in st:
        if not s:
            md.append(f"| {fam} | {m} | — | — | — | — | — | — |")
            continue
        g = lambda k: s.get(k)
        md.append(f"| {fam} | {m} | {MB(g('logical_bytes'))} | {MB(g('stored_bytes'))} | "
                  f"{RT(ratio(g('stored_bytes'), g('logical_bytes')))} | {g('chunks')} | {MB(g('index_bytes'))} | "
                  f"{g('blobs')} |")
md += ["", "## Pull time per version (s)", ""]
hdr = "| family | mode | " + " | ".join(f"v{k}" for k in range(1, nvers + 1)) + " |"
md += [hdr, "|---|---|" + "---:|" * nvers]
for fam, r in result["families"].items():
    for m, p in r["pull_s"].items():
        md.append(f"| {fam} | {m} | " + " | ".join(S(p.get(f"v{k}")) for k in range(1, nvers + 1)) + " |")
md += ["", "## The family", "",
       "| version | rootfs MB | files | flat layer gz MB | layered: new layer gz MB | layered: layers |",
       "|---|---:|---:|---:|---:|---:|"]
for v in family:
    md.append(f"| {v['version']} | {MB(v['rootfs_bytes'])} | {v['rootfs_files']} | {MB(v['flat_layer_gz'])} | "
              f"{MB(v['layered_new_layer_gz'])} | {v['layered_layers']} |")
text = "\n".join(md) + "\n"
with open(os.path.join(out_dir, "dedup.md"), "w") as f:
    f.write(text)
print(text)
PY
log "results in $BENCH_DIR/dedup.{json,md}"
