#!/usr/bin/env bash
# The two-layer python3 test image of the lazy-pull tests and benchmark, built once and cached as an OCI layout in
# ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/python (tag `latest`).
#
#   sudo scripts/build-python-image.sh [build]                  build when missing or stale; prints the layout dir
#   sudo scripts/build-python-image.sh push REGISTRY [NAME[:TAG]]
#                                                              build if needed, then push the image (plain http) to
#                                                              REGISTRY/NAME:TAG (default python:latest) with its
#                                                              blobs and manifest unchanged; prints REGISTRY/NAME:TAG@DIGEST
#   scripts/build-python-image.sh path                         print the layout dir (no build)
#   scripts/build-python-image.sh sizes                        print the layer table (LAYOUT/.sizes.tsv)
#
# Layers (both tar+gzip, written by umoci repack; config Cmd ["/usr/bin/python3","-c","print(42)"]):
#   1  debootstrap --variant=minbase bookworm: the cached debian-minbase.tar of the test fixtures
#      (crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh, debootstrapped when missing) with apt-get clean and
#      no apt lists, as in scripts/build-family.sh's v1 (debootstrap leaves 80 MB of .debs and lists)
#   2  the diff adding python3: apt-get update, apt-get install -y --no-install-recommends python3, apt-get clean,
#      rm -rf /var/lib/apt/lists/* in a chroot of layer 1's rootfs; umoci repack writes what changed or is new in
#      full and anything removed as a .wh. whiteout.  Package versions are whatever the mirror serves at build time
#      (LAYOUT/.packages.txt).
# The chroot runs in a private mount and pid namespace (unshare): /proc, the host's resolver (bound over the rootfs's
# /etc/resolv.conf) and a /dev/shm tmpfs are mounted only there and vanish with it, whatever happens to the build.
#
# Outputs (LAYOUT = the cache dir above, an OCI image layout):
#   LAYOUT/index.json, blobs/, oci-layout   the image, tag `latest`
#   LAYOUT/.sizes.tsv     per layer: digest, gzip bytes, tar bytes, tar entries, whiteouts, created_by
#   LAYOUT/.packages.txt  the installed packages and versions;  LAYOUT/.apt.log  the apt output of layer 2
#   LAYOUT/.complete      the recipe stamp (RECIPE, the package list, the minbase tarball's digest): a different stamp
#                         rebuilds; a missing minbase tarball does not (the cached image stays valid on its own)
# The build runs in the cache dir under .python-build.XXXXXX and is renamed into place only when complete; a lock
# (flock on .python.lock) keeps two builds apart (a push holds it shared); leftovers of a killed build are unmounted
# and removed by the next.
# Needs root (chroot, unshare, umoci keeping owners), umoci, python3, util-linux, network to the Debian mirror (build),
# skopeo (push).  Sizes (built 2026-11): layer 1 51 MB gzip / 121 MB tar (6,676 entries), layer 2 17 MB gzip / 46 MB
# tar (1,598 entries: python3.11 and its stdlib with .pyc, libssl3, libsqlite3, krb5, ...; no whiteouts).  The build
# takes 45-65 s on 2 cores when the minbase tarball is cached, plus removing the work dir (20-40 s on a discard mount);
# the cache is 66 MB.  The blobs are not reproducible byte for byte (timestamps): every rebuild has new digests.
set -euo pipefail
export LC_ALL=C

RECIPE=1
PACKAGES="python3"
TAG=latest

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
CACHE=${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}
LAYOUT=$CACHE/python
MINBASE_TGZ=$CACHE/debian-minbase.tar.gz # where the fixture script keeps it (same DEDUP_CACHE)
LOCK=$CACHE/.python.lock
ENV_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
L1_DESC="debootstrap --variant=minbase bookworm; apt-get clean; rm -rf /var/lib/apt/lists/*"
L2_DESC="apt-get update; apt-get install -y --no-install-recommends $PACKAGES; apt-get clean; rm -rf /var/lib/apt/lists/*"

exec 3>&2 # log's stderr, whatever redirection is active when a trap runs
trap 'exit 130' INT TERM
CHILD="" # the long-running command in progress (see run_): stopped by the EXIT trap
trap stop_child EXIT

log() { echo "build-python-image: $*" >&3; }
die() {
    log "$*"
    exit 1
}
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

mounts_under() { # DIR: mount points under DIR, deepest first (mountinfo field 5, octal escapes decoded)
    awk -v d="$1/" '{ p = $5; gsub(/\\040/, " ", p); gsub(/\\011/, "\t", p); gsub(/\\134/, "\\", p);
        if (index(p, d) == 1) print length(p) "\t" p }' /proc/self/mountinfo | sort -t$'\t' -k1,1nr | cut -f2-
}

remove_tree() { # DIR: unmounts whatever is mounted below DIR (nothing should be: the chroot's mounts live in their
    # own namespace), then removes it without leaving its filesystem
    local m
    [[ -e "$1" ]] || return 0
    while IFS= read -r m; do
        [[ -n "$m" ]] && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done < <(mounts_under "$1")
    [[ -z "$(mounts_under "$1")" ]] || die "still mounted under $1; not removing it"
    rm -rf --one-file-system "$1"
}

recipe_key() { echo "recipe $RECIPE packages $PACKAGES tag $TAG"; }

minbase_id() { stat -c '%d:%i:%s:%Y' "$1"; } # cheap identity of the minbase tarball (no hashing on the fast path)

is_complete() { # the cached layout matches this recipe and (when it still exists) the minbase tarball
    local f=$LAYOUT/.complete key dig id
    [[ -f "$f" && -f "$LAYOUT/index.json" ]] || return 1
    { read -r key && read -r dig && read -r id; } <"$f" || return 1
    [[ "$key" == "$(recipe_key)" ]] || return 1
    [[ -e "$MINBASE_TGZ" ]] || return 0
    [[ "$id" == "$(minbase_id "$MINBASE_TGZ")" ]] && return 0
    [[ "$dig" == "$(sha256sum "$MINBASE_TGZ" | cut -d' ' -f1)" ]]
}

run_() { # CMD...: runs CMD in the background and waits for it, so that a SIGTERM or SIGINT to this script is
    # handled at once (bash defers traps until a foreground command ends); the EXIT trap stops CHILD
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

stop_child() {
    [[ -n "$CHILD" ]] || return 0
    log "interrupted: stopping pid $CHILD"
    kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
    CHILD=""
}

cleanup_build() { # W: the EXIT trap of a build (a no-op after a complete one, which removed W itself)
    stop_child
    [[ -e "$1" ]] || return 0
    log "build failed or interrupted; removing $1"
    remove_tree "$1"
}

umoci_() { run_ umoci "$@" >&2; } # umoci's own messages are progress: stdout carries only our result

build() { # builds into a temporary dir next to LAYOUT, then renames it into place
    local W O B R tgz tar_ t0 rc resolv_made=0 dig
    for tool in umoci tar chroot unshare python3 sha256sum gzip; do
        command -v "$tool" >/dev/null || die "$tool missing: apt-get install -y umoci python3 util-linux"
    done
    t0=$SECONDS
    tgz=$("$repo/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
    [[ "$tgz" == "$MINBASE_TGZ" ]] || die "the fixture script keeps the minbase tarball at $tgz, not $MINBASE_TGZ"
    tar_=${tgz%.gz}
    [[ -s "$tar_" ]] || die "$tar_ missing (the fixture script keeps it next to $tgz)"

    W=$(mktemp -d "$CACHE/.python-build.XXXXXX")
    # shellcheck disable=SC2064 # W is fixed from here on
    trap "cleanup_build '$W'" EXIT
    O=$W/python
    B=$W/bundle
    R=$B/rootfs
    log "building in $W"

    umoci_ init --layout "$O"
    umoci_ new --image "$O:$TAG"
    umoci_ config --image "$O:$TAG" --no-history --config.env "PATH=$ENV_PATH" --config.workingdir / \
        --config.cmd /usr/bin/python3 --config.cmd=-c --config.cmd 'print(42)'
    umoci_ unpack --image "$O:$TAG" "$B"

    # Layer 1: the minbase rootfs, apt's caches emptied.
    log "layer 1: minbase ($tar_)"
    run_ tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$tar_" -C "$R"
    chroot "$R" /usr/bin/env -i PATH=$ENV_PATH LC_ALL=C apt-get clean
    rm -rf "$R"/var/lib/apt/lists/*
    umoci_ repack --refresh-bundle --history.created_by "$L1_DESC" --image "$O:$TAG" "$B"

    # Layer 2: + python3, in a chroot whose mounts live in a private mount (and pid) namespace.
    log "layer 2: apt-get install $PACKAGES ($((SECONDS - t0)) s so far; apt output in $O/.apt.log)"
    if [[ -L "$R/etc/resolv.conf" ]]; then
        die "$R/etc/resolv.conf is a symlink: not binding the host's resolver over it"
    elif [[ ! -e "$R/etc/resolv.conf" ]]; then
        : >"$R/etc/resolv.conf"
        resolv_made=1
    fi
    rc=0
    # (--kill-child: when unshare dies, e.g. stopped by the EXIT trap, everything in the namespace is killed)
    run_ unshare --mount --propagation private --pid --fork --kill-child -- \
        bash -c "$CHROOT_STEP" chroot-step "$R" "$ENV_PATH" "$PACKAGES" >"$O/.apt.log" 2>&1 || rc=$?
    if ((resolv_made)); then rm -f "$R/etc/resolv.conf"; fi
    if ((rc)); then
        tail -n 30 "$O/.apt.log" >&2
        die "layer 2 failed (apt output above, exit $rc)"
    fi
    [[ -z "$(mounts_under "$W")" ]] || die "mounts of the chroot leaked to the host under $W"
    # shellcheck disable=SC2016 # dpkg-query's own format
    chroot "$R" /usr/bin/env -i PATH=$ENV_PATH LC_ALL=C dpkg-query -W -f '${Package} ${Version}\n' >"$O/.packages.txt"
    chroot "$R" /usr/bin/python3 -c 'print(42)' | grep -qx 42 || die "python3 does not run in the new rootfs"
    umoci_ repack --history.created_by "$L2_DESC" --image "$O:$TAG" "$B"
    umoci_ gc --layout "$O"

    # Check the result (two tar+gzip layers whose diff_ids match) and write the layer table.
    layer_table "$O" >"$O/.sizes.tsv"
    dig=$(sha256sum "$tgz" | cut -d' ' -f1)
    printf '%s\n%s\n%s\n' "$(recipe_key)" "$dig" "$(minbase_id "$tgz")" >"$O/.complete"

    # Install: swap the complete build in; an older layout is renamed away first, then removed with W.
    if [[ -e "$LAYOUT" ]]; then mv "$LAYOUT" "$W/old"; fi
    mv "$O" "$LAYOUT"
    sync -f "$LAYOUT"
    log "built in $((SECONDS - t0)) s; removing the work dir"
    remove_tree "$W" # (the EXIT trap's job on failure)
    log "done in $((SECONDS - t0)) s: $LAYOUT"
    column -t -s $'\t' "$LAYOUT/.sizes.tsv" >&2 || cat "$LAYOUT/.sizes.tsv" >&2
}

# Run by `bash -c` inside the private namespaces: ROOTFS ENV_PATH PACKAGES.  Unmounts explicitly too, although the
# namespace's end would drop the mounts anyway.
# shellcheck disable=SC2016 # expanded by the inner bash
CHROOT_STEP='
set -euo pipefail
r=$1 path=$2 packages=$3
mount -t proc proc "$r/proc"
mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm"
in_root() { chroot "$r" /usr/bin/env -i PATH="$path" HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"; }
apt_() { in_root apt-get -y -q -o Dpkg::Use-Pty=0 "$@"; }
apt_ update
# shellcheck disable=SC2086
apt_ install --no-install-recommends $packages
apt_ clean
rm -rf "$r"/var/lib/apt/lists/*
umount "$r/dev/shm" "$r/etc/resolv.conf" "$r/proc"
'

layer_table() { # LAYOUT: checks the image and prints one line per layer
    python3 - "$1" "$TAG" <<'PY'
import gzip, hashlib, json, os, sys, tarfile
layout, tag = sys.argv[1], sys.argv[2]
def blob(d):
    return os.path.join(layout, "blobs", *d.split(":", 1))
idx = json.load(open(os.path.join(layout, "index.json")))
mdesc = [m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
assert len(mdesc) == 1, f"tag {tag}: {mdesc}"
man = json.load(open(blob(mdesc[0]["digest"])))
cfg = json.load(open(blob(man["config"]["digest"])))
layers = man["layers"]
hist = [h for h in cfg.get("history", []) if not h.get("empty_layer")]
assert len(layers) == 2, f"{len(layers)} layers, want 2"
assert cfg["config"]["Cmd"] == ["/usr/bin/python3", "-c", "print(42)"], cfg["config"].get("Cmd")
class Hashing:
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0
    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        self.n += len(b)
        return b
print("layer\tdigest\tgzip_bytes\ttar_bytes\tentries\twhiteouts\tcreated_by")
for i, l in enumerate(layers):
    assert l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip", l["mediaType"]
    path = blob(l["digest"])
    assert os.path.getsize(path) == l["size"], (path, l["size"])
    with gzip.open(path) as g:
        hr = Hashing(g)
        entries = whiteouts = 0
        with tarfile.open(fileobj=hr, mode="r|") as t:
            for m in t:
                entries += 1
                if os.path.basename(m.name).startswith(".wh."):
                    whiteouts += 1
        while hr.read(1 << 20):
            pass
    diff_id = "sha256:" + hr.h.hexdigest()
    assert diff_id == cfg["rootfs"]["diff_ids"][i], (diff_id, cfg["rootfs"]["diff_ids"][i])
    desc = hist[i].get("created_by", "") if i < len(hist) else ""
    print(f"{i + 1}\t{l['digest']}\t{l['size']}\t{hr.n}\t{entries}\t{whiteouts}\t{desc}")
PY
}

ensure_built() {
    local d
    is_complete && return 0 # fast path: no lock, no root needed
    [[ $(id -u) -eq 0 ]] || die "must run as root to build (chroot, unshare, umoci keeping owners)"
    mkdir -p "$CACHE"
    exec 9>>"$LOCK"
    if ! flock -n 9; then
        log "waiting for another build ($LOCK)"
        run_ flock 9 # (the lock belongs to the open file, which the child shares)
    fi
    if ! is_complete; then # (else built meanwhile by another run)
        for d in "$CACHE"/.python-build.*; do
            [[ -e "$d" ]] || continue
            log "removing the leftovers of an interrupted build: $d"
            remove_tree "$d"
        done
        if [[ -e "$LAYOUT" ]]; then
            log "stale cache (the recipe or the minbase tarball changed, or the layout is incomplete): rebuilding"
        fi
        build
    fi
    exec 9>&-
}

push() { # REGISTRY NAME[:TAG]
    local reg=$1 ref=$2 dest want got
    command -v skopeo >/dev/null || die "skopeo missing: apt-get install -y skopeo"
    [[ "${ref##*/}" == *:* ]] || ref+=":latest"
    dest=$reg/$ref
    # A shared lock for the duration of the copy: a rebuild (recipe change) cannot swap the layout under it.
    if exec 8>>"$LOCK" 2>/dev/null; then flock -s 8; fi
    is_complete || die "$LAYOUT is being rebuilt or is stale; run build first"
    want=$(python3 -c '
import json, sys
idx = json.load(open(sys.argv[1] + "/index.json"))
print([m["digest"] for m in idx["manifests"]
       if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == sys.argv[2]][0])' "$LAYOUT" "$TAG")
    log "pushing oci:$LAYOUT:$TAG to docker://$dest"
    run_ skopeo copy --quiet --insecure-policy --preserve-digests --dest-tls-verify=false \
        "oci:$LAYOUT:$TAG" "docker://$dest" >&2 || die "skopeo copy to docker://$dest failed"
    got=sha256:$(skopeo inspect --raw --tls-verify=false "docker://$dest" | sha256sum | cut -d' ' -f1)
    [[ "$got" == "$want" ]] || die "the registry's manifest of $dest is $got, the layout's $want"
    echo "$dest@$want"
}

case ${1:-build} in
build)
    (($# <= 1)) || die "usage: build-python-image.sh build"
    ensure_built
    echo "$LAYOUT"
    ;;
push)
    [[ $# -ge 2 && $# -le 3 && -n "$2" ]] || die "usage: build-python-image.sh push REGISTRY [NAME[:TAG]]"
    ensure_built
    push "$2" "${3:-python:latest}"
    ;;
path) echo "$LAYOUT" ;;
sizes)
    [[ -f "$LAYOUT/.sizes.tsv" ]] || die "not built yet: run build-python-image.sh build"
    cat "$LAYOUT/.sizes.tsv"
    ;;
-h | --help | help) usage ;;
*)
    usage >&2
    die "unknown command $1 (build|push REGISTRY [NAME[:TAG]]|path|sizes)"
    ;;
esac
