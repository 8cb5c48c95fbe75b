#!/usr/bin/env bash
# The image family of the dedup benchmark (issue 6, scripts/bench-dedup.sh): 10 versions of a Debian bookworm
# rootfs, each one the previous plus a few packages (apt-get in a chroot), as OCI layouts in two shapes.  Built once
# and cached in ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/family/.
#
#   sudo scripts/build-family.sh [build]          build when missing or stale; prints the family dir on stdout
#   sudo scripts/build-family.sh push REGISTRY    build if needed, then push the 20 images (plain http) to
#                                                 REGISTRY/family-flat:v1..v10 and REGISTRY/family-layered:v1..v10
#   scripts/build-family.sh path                  print the family dir (no build)
#   scripts/build-family.sh sizes                 print FAMILY/sizes.tsv
#
# Versions (cumulative; every step: apt-get update, the actions below with --no-install-recommends and
# DEBIAN_FRONTEND=noninteractive, then apt-get clean and rm -rf /var/lib/apt/lists/*):
#   v1   debootstrap --variant=minbase bookworm: the cached debian-minbase.tar of the test fixtures
#        (crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh), apt-get clean, no apt lists
#   v2   + ca-certificates curl
#   v3   + python3-minimal
#   v4   + python3
#   v5   + procps iproute2 less vim-tiny jq
#   v6   bookworm-updates and bookworm-security added to the sources, apt-get upgrade (20 packages at the last build:
#        apt, perl-base, libssl3, openssl, python3.11 and its stdlib, tzdata, ca-certificates, jq, ...: new versions of
#        files already there, many unchanged inside), + openssh-client wget
#   v7   + git (brings perl)
#   v8   + python3-pip python3-venv
#   v9   + rsync gnupg
#   v10  vim-tiny purged, + python3-yaml python3-requests make
# Besides new files, every step rewrites dpkg/apt/debconf state, /etc/ld.so.cache, logs: the small "upgrade" changes
# of a real image history.  Package versions are whatever the mirror serves at build time (FAMILY/logs lists them).
#
# Outputs (FAMILY = the cache dir above):
#   FAMILY/flat       OCI layout, tags v1..v10: each version's whole rootfs as ONE tar+gzip layer
#   FAMILY/layered    OCI layout, tags v1..v10: v1 = flat:v1's layer; vK = vK-1's layers + one layer holding the
#                     diff (umoci repack: changed and new files in full, removed ones as .wh. whiteouts)
#   FAMILY/sizes.tsv  per version: rootfs bytes (apparent) and files, flat layer gzip bytes, layered new-layer gzip
#                     bytes, layered image gzip bytes
#   FAMILY/logs/      vK.log: the apt output of each step; packages-vK.txt: the installed packages and versions
#   FAMILY/.complete  the recipe stamp (RECIPE, the steps, the minbase tarball's digest): a different stamp rebuilds
# The build runs in FAMILY's parent under .family-build.XXXXXX and is renamed into place only when complete; a lock
# (flock on .family.lock) keeps two builds apart; leftovers of a killed build are unmounted and removed by the next.
# Sizes (recipe 2, built 2026-11): rootfs v1 120 MB (5,238 files) -> v10 341 MB (13,101 files); flat: 940 MB of gzip
# layers for the 10 images (2.2 GB unpacked), layered: 168 MB in all (v6's upgrade layer 28 MB, v7's git 37 MB).
# Needs root (chroot, mounts, umoci keeping owners), umoci, skopeo (push), python3, network to the Debian mirror.
# The build takes about 5 minutes on 2 cores (apt downloads, umoci gzip), the cache about 1.1 GB; a push of all 20
# images to a loopback registry about 30 s.
set -euo pipefail
export LC_ALL=C

RECIPE=2
# Steps 2..10: actions separated by ';': `install PKG...`, `purge PKG...`, `updates` (add bookworm-updates and
# bookworm-security to the sources), `upgrade`.
STEPS=(
    [2]="install ca-certificates curl"
    [3]="install python3-minimal"
    [4]="install python3"
    [5]="install procps iproute2 less vim-tiny jq"
    [6]="updates; upgrade; install openssh-client wget"
    [7]="install git"
    [8]="install python3-pip python3-venv"
    [9]="install rsync gnupg"
    [10]="purge vim-tiny; install python3-yaml python3-requests make"
)
NVERSIONS=10
FAMILIES=(flat layered)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
CACHE=${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}
FAMILY=$CACHE/family

trap 'exit 130' INT TERM

log() { echo "build-family: $*" >&2; }
die() {
    log "$*"
    exit 1
}

mounts_under() { # DIR: mount points under DIR, deepest first (mountinfo field 5, octal escapes decoded)
    awk -v d="$1/" '{ p = $5; gsub(/\\040/, " ", p); gsub(/\\011/, "\t", p); gsub(/\\134/, "\\", p);
        if (index(p, d) == 1) print length(p) "\t" p }' /proc/self/mountinfo | sort -t$'\t' -k1,1nr | cut -f2-
}

remove_tree() { # DIR: unmounts whatever is mounted below DIR, then removes it without leaving its filesystem
    local m
    [[ -e "$1" ]] || return 0
    while IFS= read -r m; do
        [[ -n "$m" ]] && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done < <(mounts_under "$1")
    [[ -z "$(mounts_under "$1")" ]] || die "still mounted under $1; not removing it"
    rm -rf --one-file-system "$1"
}

minbase_tar() { # prints the cached minbase tarball (uncompressed), building it when missing
    local tgz
    tgz=$("$repo/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
    echo "${tgz%.gz}"
}

stamp() { # the recipe stamp: RECIPE, the steps, the minbase tarball
    local tgz k
    tgz=$("$repo/crates/dedup-snapshotter/tests/fixtures/debian-minbase.sh")
    {
        echo "recipe $RECIPE"
        for ((k = 2; k <= NVERSIONS; k++)); do echo "v$k ${STEPS[$k]}"; done
        echo "minbase $(sha256sum "$tgz" | cut -d' ' -f1)"
    } | sha256sum | cut -c1-16
}

is_complete() { [[ -f "$FAMILY/.complete" && "$(cat "$FAMILY/.complete")" == "$1" ]]; }

new_image() { # LAYOUT TAG
    umoci new --image "$1:$2"
    umoci config --image "$1:$2" --config.env 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --config.cmd /bin/bash --config.workingdir / --no-history
}

build() { # STAMP: builds into a temporary dir next to FAMILY, then renames it into place
    local want=$1 W R O tar_ k t0 mirror security rc
    for tool in umoci tar chroot python3 sha256sum; do
        command -v "$tool" >/dev/null || die "$tool missing: apt-get install -y umoci python3"
    done
    tar_=$(minbase_tar)
    W=$(mktemp -d "$CACHE/.family-build.XXXXXX")
    # shellcheck disable=SC2064 # W is fixed from here on
    trap "remove_tree '$W'" EXIT
    O=$W/family
    R=$W/bundle/rootfs
    mkdir -p "$O/logs"
    t0=$SECONDS
    log "building in $W (recipe stamp $want)"

    umoci init --layout "$O/flat"
    umoci init --layout "$O/layered"

    # v1: the minbase rootfs with apt's caches emptied as in every later step (debootstrap leaves the .debs and the
    # lists: 80 MB), tarred once: the one layer of flat:v1 and of layered:v1.
    log "v1: minbase"
    R=$W/v1
    mkdir -p "$R"
    tar --numeric-owner --xattrs --xattrs-include='*' -xpf "$tar_" -C "$R"
    in_root "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/*
    flat_version 1 'debootstrap --variant=minbase bookworm; apt-get clean'
    new_image "$O/layered" v1
    umoci raw add-layer --image "$O/layered:v1" \
        --history.created_by 'debootstrap --variant=minbase bookworm; apt-get clean' "$W/flat.tar"
    rm -rf --one-file-system "$R" "$W/flat.tar"
    umoci unpack --image "$O/layered:v1" "$W/bundle" >/dev/null
    R=$W/bundle/rootfs

    mirror=$(awk '$1 == "deb" { print $2; exit }' "$R/etc/apt/sources.list")
    [[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian
    security=${FAMILY_SECURITY_MIRROR:-}
    if [[ -z "$security" ]]; then
        security=http://deb.debian.org/debian-security
        if [[ $mirror == */debian ]]; then security=${mirror}-security; fi
    fi

    for ((k = 2; k <= NVERSIONS; k++)); do
        log "v$k: ${STEPS[$k]} ($((SECONDS - t0)) s so far)"
        enter_chroot "$R"
        rc=0
        run_step "$R" "${STEPS[$k]}" "$mirror" "$security" >"$O/logs/v$k.log" 2>&1 || rc=$?
        leave_chroot "$R"
        if ((rc)); then
            tail -n 30 "$O/logs/v$k.log" >&2
            die "v$k failed (log above)"
        fi
        umoci repack --refresh-bundle --history.created_by "${STEPS[$k]}" --image "$O/layered:v$k" "$W/bundle"
        flat_version "$k" "v$k: ${STEPS[$k]}"
        rm -f "$W/flat.tar"
    done
    umoci gc --layout "$O/flat"
    umoci gc --layout "$O/layered"
    write_sizes "$O" >"$O/sizes.tsv"
    echo "$want" >"$O/.complete"

    # Install: swap the complete build in; an older family is renamed away first, then removed.
    local old=""
    if [[ -e "$FAMILY" ]]; then
        old=$W/old
        mv "$FAMILY" "$old"
    fi
    mv "$O" "$FAMILY"
    sync -f "$FAMILY"
    log "done in $((SECONDS - t0)) s: $FAMILY"
    column -t "$FAMILY/sizes.tsv" >&2 || cat "$FAMILY/sizes.tsv" >&2
}

flat_version() { # K DESC (uses W, R, O): the whole rootfs (tarred into W/flat.tar) as the one layer of flat:vK
    local k=$1 desc=$2
    tar --numeric-owner --xattrs --xattrs-include='*' --sort=name -C "$R" -cf "$W/flat.tar" .
    new_image "$O/flat" "v$k"
    umoci raw add-layer --image "$O/flat:v$k" --history.created_by "$desc" "$W/flat.tar"
    rootfs_stats "$R" >"$W/rootfs-v$k"
    # shellcheck disable=SC2016 # dpkg-query's own format
    in_root "$R" dpkg-query -W -f '${Package} ${Version}\n' >"$O/logs/packages-v$k.txt"
}

rootfs_stats() { # DIR: "APPARENT_BYTES FILES"
    local bytes files
    bytes=$(du -sxb "$1" | cut -f1)
    files=$(find "$1" -xdev -type f | wc -l)
    echo "$bytes $files"
}

enter_chroot() { # ROOTFS: /proc for dpkg and the maintainer scripts, the host's resolver bound over the rootfs's
    # file (which stays untouched), a tmpfs on /dev/shm; /dev itself is the rootfs's own nodes (debootstrap made them)
    mount -t proc proc "$1/proc"
    mount --bind /etc/resolv.conf "$1/etc/resolv.conf"
    mount -t tmpfs tmpfs "$1/dev/shm"
}

leave_chroot() { # ROOTFS
    umount "$1/dev/shm"
    umount "$1/etc/resolv.conf"
    umount "$1/proc"
}

in_root() { # ROOTFS CMD...
    local r=$1
    shift
    chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"
}

run_step() { # ROOTFS STEPS MIRROR SECURITY_MIRROR: one version's apt actions (every command checked: this runs
    # where errexit does not apply)
    local r=$1 steps=$2 mirror=$3 security=$4 action verb args actions
    apt_() { in_root "$r" apt-get -y -q -o Dpkg::Use-Pty=0 "$@"; }
    IFS=';' read -r -a actions <<<"$steps"
    apt_ update || return 1
    for action in "${actions[@]}"; do
        read -r verb args <<<"$action"
        echo "=== $verb $args"
        # shellcheck disable=SC2086 # package lists are split on purpose
        case $verb in
        install) apt_ install --no-install-recommends $args || return 1 ;;
        purge) apt_ purge --autoremove $args || return 1 ;;
        upgrade) apt_ upgrade || return 1 ;;
        updates)
            printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
                "$mirror" "$mirror" "$security" >"$r/etc/apt/sources.list" || return 1
            apt_ update || return 1
            ;;
        *)
            echo "unknown action $verb" >&2
            return 1
            ;;
        esac
    done
    apt_ clean || return 1
    rm -rf "$r"/var/lib/apt/lists/* || return 1
}

write_sizes() { # LAYOUT_DIR: the sizes table (rootfs stats from W/rootfs-vK, layer sizes from the layouts)
    local O=$1
    python3 - "$O" "$W" "$NVERSIONS" <<'PY'
import json, os, sys
out, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def manifest(layout, tag):
    idx = json.load(open(os.path.join(layout, "index.json")))
    for m in idx["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            d = m["digest"].split(":", 1)[1]
            return json.load(open(os.path.join(layout, "blobs", "sha256", d)))
    raise SystemExit(f"no tag {tag} in {layout}")
print("version\trootfs_bytes\trootfs_files\tflat_layer_gz\tlayered_new_layer_gz\tlayered_layers\tlayered_total_gz")
for k in range(1, n + 1):
    rb, rf = open(os.path.join(work, f"rootfs-v{k}")).read().split()
    fl = manifest(os.path.join(out, "flat"), f"v{k}")["layers"]
    ll = manifest(os.path.join(out, "layered"), f"v{k}")["layers"]
    assert len(fl) == 1, fl
    print(f"v{k}\t{rb}\t{rf}\t{fl[0]['size']}\t{ll[-1]['size']}\t{len(ll)}\t{sum(l['size'] for l in ll)}")
PY
}

push() { # REGISTRY: all 20 images, three copies at a time
    local reg=$1 fam k pids=() names=() i rc=0 logs
    command -v skopeo >/dev/null || die "skopeo missing: apt-get install -y skopeo"
    logs=$(mktemp -d /tmp/family-push.XXXXXX)
    for fam in "${FAMILIES[@]}"; do
        for ((k = 1; k <= NVERSIONS; k++)); do
            while (($(jobs -pr | wc -l) >= 3)); do wait -n || true; done
            skopeo copy --quiet --insecure-policy --dest-tls-verify=false \
                "oci:$FAMILY/$fam:v$k" "docker://$reg/family-$fam:v$k" \
                >"$logs/$fam-v$k.log" 2>&1 &
            pids+=($!)
            names+=("$fam-v$k")
        done
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            log "push of ${names[$i]} failed: $(cat "$logs/${names[$i]}.log")"
            rc=1
        fi
    done
    rm -rf "$logs"
    ((rc == 0)) || die "push to $reg failed"
    log "pushed family-{flat,layered}:v1..v$NVERSIONS to $reg"
}

ensure_built() {
    local want d
    [[ $(id -u) -eq 0 ]] || die "must run as root (chroot, mounts, umoci keeping owners)"
    mkdir -p "$CACHE"
    want=$(stamp)
    is_complete "$want" && return 0
    exec 9>"$CACHE/.family.lock"
    flock 9
    is_complete "$want" && return 0 # built meanwhile by another run
    for d in "$CACHE"/.family-build.*; do
        [[ -e "$d" ]] || continue
        log "removing the leftovers of an interrupted build: $d"
        remove_tree "$d"
    done
    if [[ -e "$FAMILY" ]]; then
        log "recipe changed (stamp $(cat "$FAMILY/.complete" 2>/dev/null || echo none) -> $want): rebuilding"
    fi
    build "$want"
    exec 9>&-
}

case ${1:-build} in
build)
    ensure_built
    echo "$FAMILY"
    ;;
push)
    [[ -n "${2:-}" ]] || die "usage: build-family.sh push REGISTRY"
    ensure_built
    push "$2"
    ;;
path) echo "$FAMILY" ;;
sizes) cat "$FAMILY/sizes.tsv" ;;
-h | --help | help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
*) die "unknown command $1 (build|push REGISTRY|path|sizes)" ;;
esac
