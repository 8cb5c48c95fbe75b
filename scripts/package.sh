#!/usr/bin/env bash
# Builds the Debian package of dedup-snapshotter from this workspace with dpkg-deb (no debhelper, no cargo-deb).
# dpkg-deb, not cargo-deb: cargo-deb would first be compiled (`cargo install`, minutes on two cores) to write what
# is a file list, a control file and three maintainer scripts here; dpkg-deb and dpkg-shlibdeps come with dpkg-dev.
#
# usage: scripts/package.sh [--no-build] [--bin-dir DIR] [--out DIR]
#
#   --no-build     use the binaries already built (default: `cargo build --workspace --release` first, the same
#                  command scripts/test.sh runs, so after it this is a no-op)
#   --bin-dir DIR  where dedup-snapshotter and dedupd are (default: target/release)
#   --out DIR      where the .deb goes (default: target/debian)
#
# Prints the path of the .deb on stdout (progress on stderr). Environment: DEB_VERSION (default: the workspace's
# version from Cargo.toml), DEB_MAINTAINER.
#
# The package (Architecture: the build machine's, Depends from dpkg-shlibdeps):
#   /usr/bin/dedup-snapshotter, /usr/bin/dedupd                  stripped
#   /lib/systemd/system/{dedup-snapshotter,dedupd}.service       contrib/*.service as they are
#   /etc/dedup-snapshotter/config.toml                            contrib/config.toml, a conffile
#   /usr/share/doc/dedup-snapshotter/README.md                    uncompressed: the units' Documentation= names it
#   /usr/share/doc/dedup-snapshotter/examples/                    the containerd, k3s and Kubernetes snippets
#   /usr/share/doc/dedup-snapshotter/{copyright,changelog.gz}      changelog.gz: a native package (no Debian revision)
#   /usr/share/lintian/overrides/dedup-snapshotter                the units' intended WantedBy=containerd.service
# The units are neither enabled nor started on install: containerd's config has to name the proxy plugins first
# (README, "Using it with containerd").
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
pkg=dedup-snapshotter

build=1
bin_dir=$repo/target/release
out_dir=$repo/target/debian
while (($#)); do
    case "$1" in
    --no-build) build=0 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --out) out_dir=${2:?--out needs a directory}; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "package.sh: $*" >&2; }
die() { log "$*"; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip gzip md5sum; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install -y dpkg-dev binutils)"
done

if ((build)); then
    log "cargo build --workspace --release"
    (cd "$repo" && cargo build --workspace --release >&2)
fi
for b in dedup-snapshotter dedupd; do
    [[ -x "$bin_dir/$b" ]] || die "$bin_dir/$b is missing (build the workspace: cargo build --workspace --release)"
done

# The workspace's version: the first `version = "..."` of [workspace.package].
version=${DEB_VERSION:-$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
    p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' "$repo/Cargo.toml")}
[[ -n "$version" ]] || die "no version in [workspace.package] of $repo/Cargo.toml"
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-dedup-snapshotter maintainers <maintainers@dedup-snapshotter.invalid>}

mkdir -p "$out_dir"
work=$(mktemp -d "$out_dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants the binaries inside debian/<package>/ next to a debian/control.
root=$work/debian/$pkg
doc=$root/usr/share/doc/$pkg
install -d -m755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/$pkg" "$doc/examples"

for b in dedup-snapshotter dedupd; do
    install -m755 "$bin_dir/$b" "$root/usr/bin/$b"
    # Release builds carry debug info (profile.release debug = 1): 90 MB of it would go into every install.
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$b"
done
install -m644 "$repo/contrib/dedup-snapshotter.service" "$repo/contrib/dedupd.service" "$root/lib/systemd/system/"
install -m644 "$repo/contrib/config.toml" "$root/etc/$pkg/config.toml"
install -m644 "$repo/README.md" "$doc/README.md"
install -m644 "$repo/contrib/containerd-config.toml" "$repo/contrib/containerd-config-v3.toml" "$doc/examples/"
install -d -m755 "$doc/examples/k3s" "$doc/examples/kubernetes"
install -m644 "$repo/contrib/k3s/config-v3.toml.tmpl" "$doc/examples/k3s/"
install -m644 "$repo/contrib/kubernetes/daemonset.yaml" "$doc/examples/kubernetes/"

# A fixed date keeps the package reproducible from the same tree (SOURCE_DATE_EPOCH wins when set).
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}
year=$(date -u -d "@$epoch" +%Y)
license=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
    p && $1 == "license" { gsub(/"/, "", $3); print $3; exit }' "$repo/Cargo.toml")
[[ "$license" == Apache-2.0 ]] || die "the workspace license is '$license'; update the copyright file for it"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $pkg

Files: *
Copyright: $year dedup-snapshotter developers
License: Apache-2.0

Comment: The binaries link statically the Rust crates listed in the source tree's Cargo.lock, each under its own
 license (MIT, Apache-2.0, BSD or similar permissive terms).

License: Apache-2.0
 On Debian systems the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
 documentation files (the "Software"), to deal in the Software without restriction, including without limitation
 the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
 to permit persons to whom the Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies or substantial portions of
 the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
 THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
 CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
 IN THE SOFTWARE.
EOF
chmod 644 "$doc/copyright"

rev=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
printf '%s (%s) unstable; urgency=medium\n\n  * Built from git %s.\n\n -- %s  %s\n' \
    "$pkg" "$version" "$rev" "$maintainer" "$(date -u -R -d "@$epoch")" |
    gzip -9n >"$doc/changelog.gz"
chmod 644 "$doc/changelog.gz"

# The snapshotter unit is wanted by containerd.service on purpose (a containerd started by hand still gets it).
install -d -m755 "$root/usr/share/lintian/overrides"
echo "$pkg: systemd-service-file-refers-to-unusual-wantedby-target containerd.service [lib/systemd/system/dedup-snapshotter.service]" \
    >"$root/usr/share/lintian/overrides/$pkg"
chmod 644 "$root/usr/share/lintian/overrides/$pkg"

echo /etc/$pkg/config.toml >"$root/DEBIAN/conffiles"

# Units: systemd learns about new or changed unit files; only the snapshotter is restarted on upgrade, as its
# restart is harmless to running containers. A dedupd restart turns running containers' reads of data not yet
# fetched into EIO, so that one is left to the administrator. Nothing happens without systemd (chroots, containers).
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    if [ -n "$2" ] && command -v deb-systemd-invoke >/dev/null; then
        deb-systemd-invoke try-restart dedup-snapshotter.service >/dev/null || true
    fi
fi
exit 0
EOF
cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ] && command -v deb-systemd-invoke >/dev/null; then
    deb-systemd-invoke stop dedup-snapshotter.service dedupd.service >/dev/null || true
fi
exit 0
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
exit 0
EOF
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$pkg" "$pkg" >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O "debian/$pkg/usr/bin/dedup-snapshotter" "debian/$pkg/usr/bin/dedupd")
depends=${shlibs#shlibs:Depends=}
[[ "$shlibs" == shlibs:Depends=* && -n "$depends" ]] || die "dpkg-shlibdeps printed '$shlibs'"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Suggests: containerd, fuse3, erofs-utils
Section: admin
Priority: optional
Description: containerd snapshotter and differ storing image layers as EROFS images
 dedup-snapshotter serves containerd's Snapshots and Diff APIs as a proxy plugin
 on a unix socket: each image layer becomes one read-only EROFS image that the
 kernel mounts directly, converted from the layer blob in one streaming pass.
 With --dedup, file data is stored once per node in content-addressed chunks.
 .
 dedupd is its FUSE fetch daemon for lazy pulls: layers of images converted
 with "dedup-snapshotter convert-image" are mounted before they are downloaded
 and fetched from the registry, verified chunk by chunk, as they are read.
 .
 Needs a kernel with erofs and overlay (and fuse for dedupd). dedupd mounts
 its FUSE file system itself as root; fusermount3 (fuse3) is only a fallback.
EOF

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

deb=$out_dir/${pkg}_${version}_${arch}.deb
SOURCE_DATE_EPOCH=$epoch dpkg-deb --root-owner-group -Zxz --build "$root" "$deb.tmp" >&2
mv -f "$deb.tmp" "$deb"
log "built $deb ($(du -h "$deb" | cut -f1))"
echo "$deb"
