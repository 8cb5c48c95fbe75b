#!/usr/bin/env bash
# A private containerd + registry + proxy snapshotter for end-to-end tests, all living in one directory.
#
# usage: [E2E_CONTAINERD=1.6|1.7|2.1] [E2E_CRI=1] [E2E_CONTAINERD_EXTRA=FILE] e2e-env.sh start DIR [SNAPSHOTTER_CMD]
#        e2e-env.sh restart-snapshotter DIR     (starts the snapshotter again, e.g. after a kill -9)
#        e2e-env.sh stop DIR
#
# SNAPSHOTTER_CMD has {root}, {socket} and {containerd} (containerd's socket) substituted (default:
#   target/release/dedup-snapshotter serve --root {root} --address {socket}).
# Leading words starting with `+` are flags for the harness, not part of the command:
#   +noerofs  the snapshotter is not ours (skip EROFS layout checks; read by the Rust test)
#   +rmsock   remove a stale socket before restart-snapshotter (for daemons that do not do it themselves)
#   +nodiff   the daemon serves no Diff service: containerd >= 1.7 gets no `diff` proxy (implied by `--differs none`)
# The word `reference` alone means `+noerofs +rmsock +nodiff scripts/harness/reference.sh --root {root}
# --address {socket}` (containerd's own overlayfs snapshotter served as a proxy).
#
# E2E_CONTAINERD picks containerd: 1.6 (default; the system's), 1.7 (1.7.24, Debian trixie's) or 2.1 (2.1.9, Debian
# forky's), the latter two installed into a cache on first use by scripts/lib/containerd-versions.sh. Its bin dir
# comes first in PATH for containerd and all it starts (containerd-shim-runc-v2 is found through PATH) and for ctr.
#   1.6: config `version = 2`, the Snapshots proxy only (1.6 has no diff proxies: our Commit converts).
#   1.7: config `version = 2`; 2.1: `version = 3`. Both also get our Diff service as the proxy `dedup-diff` on the
#   same socket, first in the diff service's `default` (then containerd's `walking`), and the transfer service's
#   unpack_config for linux/amd64: snapshotter `dedup` with differ `dedup-diff`, `overlayfs` with `walking`.
#   A SNAPSHOTTER_CMD of ours (`... serve ...`) without `--containerd` gets `--containerd DIR/containerd.sock`
#   appended: the Diff service reads and writes blobs in that containerd's content store.
#
# E2E_CRI=1 enables containerd's CRI plugin (see write_cri_config); E2E_CONTAINERD_EXTRA names a TOML file appended to
# the generated containerd.toml (extra plugins' tables, more unpack_config entries; not the tables written here).
#
# start: builds (cached) and pushes the test images (busybox, layered, minbase, busybox-plus; see build-test-images.sh) from
# ${E2E_IMAGES:-/var/cache/dedup-snapshotter-tests/oci} to a docker-registry on 127.0.0.1:<free port>, starts the
# snapshotter (root DIR/snapshotter, socket DIR/dedup.sock) and containerd (DIR/containerd.toml, socket
# DIR/containerd.sock, proxy plugin `dedup`), waits until each answers, writes DIR/env (sourceable KEY=VALUE lines,
# among them E2E_CONTAINERD, E2E_CONTAINERD_VERSION, E2E_CONTAINERD_BIN (bin dir), E2E_CTR, E2E_DIFF_PROXY (0/1)).
# Logs: DIR/logs/*.log.
# stop: kills tasks, containerd, the snapshotter, the registry (only the processes it started, by pid), unmounts
# everything under DIR (deepest first) and checks nothing stays mounted there.  DIR itself is left for the caller.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cmd=${1:-}
dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || { sed -n '2,34p' "$0" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
envf=$dir/env
logs=$dir/logs

log() { echo "e2e-env: $*" >&2; }
die() { log "$*"; exit 1; }

setenv() { # KEY VALUE: set/replace in DIR/env
    local tmp
    tmp=$(mktemp "$envf.XXXXXX")
    { [[ -f "$envf" ]] && grep -v "^$1=" "$envf" || true; printf '%s=%q\n' "$1" "$2"; } >"$tmp"
    mv "$tmp" "$envf"
}

alive() { # PID: running and not a zombie (our daemons are reparented when this script exits; a zombie may linger)
    local st
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ "${st:0:1}" != Z ]]
}

wait_for() { # DESC TIMEOUT PID CMD...: retries CMD until it succeeds; fails when PID died or on timeout
    local desc=$1 timeout=$2 pid=$3 i
    shift 3
    for ((i = 0; i < timeout * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -n "$pid" ]] && ! alive "$pid"; then
            die "$desc exited before answering (see $logs)"
        fi
        sleep 0.1
    done
    die "$desc did not answer within ${timeout}s (see $logs)"
}

free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then echo "$p"; return; fi
    done
    die "no free port"
}

parse_snapshotter_cmd() { # sets SNAP_FLAGS and SNAP_CMD from $1
    local c=$1 w
    if [[ "$c" == reference ]]; then
        c="+noerofs +rmsock +nodiff $here/harness/reference.sh --root {root} --address {socket}"
    fi
    SNAP_FLAGS=""
    read -r -a words <<<"$c"
    while ((${#words[@]})) && [[ "${words[0]}" == +* ]]; do
        SNAP_FLAGS+="${SNAP_FLAGS:+ }${words[0]#+}"
        words=("${words[@]:1}")
    done
    SNAP_CMD=""
    for w in "${words[@]}"; do SNAP_CMD+="${SNAP_CMD:+ }$w"; done
    SNAP_CMD=${SNAP_CMD//\{root\}/$dir/snapshotter}
    SNAP_CMD=${SNAP_CMD//\{socket\}/$dir/dedup.sock}
    SNAP_CMD=${SNAP_CMD//\{containerd\}/$dir/containerd.sock}
}

# Sets CTRD_BIN, CTRD_VERSION and CTRD_CONFIG_VERSION for $E2E_CONTAINERD and puts CTRD_BIN first in PATH.
select_containerd() {
    E2E_CONTAINERD=${E2E_CONTAINERD:-1.6}
    case "$E2E_CONTAINERD" in
    1.6 | 1.7) CTRD_CONFIG_VERSION=2 ;;
    2.1) CTRD_CONFIG_VERSION=3 ;;
    *) die "E2E_CONTAINERD=$E2E_CONTAINERD: known versions are 1.6, 1.7, 2.1" ;;
    esac
    CTRD_BIN=$("$here/lib/containerd-versions.sh" install "$E2E_CONTAINERD") ||
        die "cannot install containerd $E2E_CONTAINERD (scripts/lib/containerd-versions.sh)"
    export PATH="$CTRD_BIN:$PATH"
    # `containerd github.com/containerd/containerd 1.7.24~ds1 <revision>`
    CTRD_VERSION=$("$CTRD_BIN/containerd" --version | awk '{print $3}')
    [[ -n "$CTRD_VERSION" ]] || die "$CTRD_BIN/containerd --version printed no version"
}

# Whether containerd gets our Diff service as a `diff` proxy: >= 1.7, and a daemon that serves it.
wants_diff_proxy() {
    [[ "$E2E_CONTAINERD" != 1.6 ]] || return 1
    [[ " $SNAP_FLAGS " != *" nodiff "* ]] || return 1
    [[ " $SNAP_CMD " != *" --differs none "* && " $SNAP_CMD " != *" --differs=none "* ]] || return 1
}

# containerd 1.7's transfer service (`ctr images pull --local=false`) ignores --plain-http: it speaks HTTPS only, and
# trusts the system's roots (Go reads SSL_CERT_FILE). For 1.7 the same registry storage is also served over TLS with a
# throwaway self-signed certificate for 127.0.0.1, which only our containerd is told to trust (E2E_REGISTRY_TLS).
start_tls_registry() {
    command -v openssl >/dev/null || die "missing: openssl (apt-get install -y openssl)"
    mkdir -p "$dir/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 -subj /CN=127.0.0.1 \
        -addext subjectAltName=IP:127.0.0.1 -keyout "$dir/tls/key.pem" -out "$dir/tls/cert.pem" >/dev/null 2>&1 ||
        die "openssl could not make a certificate for the TLS registry"
    local port
    port=$(free_port)
    sed -e "s|addr: 127.0.0.1:.*|addr: 127.0.0.1:$port\n  tls:\n    certificate: $dir/tls/cert.pem\n    key: $dir/tls/key.pem|" \
        "$dir/registry.yml" >"$dir/registry-tls.yml"
    setsid docker-registry serve "$dir/registry-tls.yml" >>"$logs/registry-tls.log" 2>&1 </dev/null &
    local pid=$!
    setenv E2E_REGISTRY_TLS_PID "$pid"
    setenv E2E_REGISTRY_TLS "127.0.0.1:$port"
    wait_for "docker-registry (TLS)" 30 "$pid" curl -fsS --cacert "$dir/tls/cert.pem" "https://127.0.0.1:$port/v2/"
}

write_containerd_config() {
    local disabled='"io.containerd.grpc.v1.cri"'
    if [[ "${E2E_CRI:-0}" == 1 ]]; then
        disabled=""
    elif [[ "$CTRD_CONFIG_VERSION" == 3 ]]; then
        # containerd 2.x splits CRI into three plugins; none is wanted here
        disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"'
    fi
    cat >"$dir/containerd.toml" <<TOML
version = $CTRD_CONFIG_VERSION
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = [$disabled]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  level = "info"

# Collect garbage (and so remove the proxy's snapshots) right after each deletion, not only every 100 mutations.
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1

[proxy_plugins.dedup]
  type = "snapshot"
  address = "$dir/dedup.sock"
TOML
    if [[ "$CTRD_CONFIG_VERSION" == 3 ]]; then
        # 2.x's transfer service labels each layer's Prepare (digest, image) for snapshotters that ask, as
        # contrib/containerd-config-v3.toml does: `ctr images pull` can then mount converted layers lazily.
        cat >>"$dir/containerd.toml" <<TOML
  [proxy_plugins.dedup.exports]
    enable_remote_snapshot_annotations = "true"
TOML
    fi
    [[ "$E2E_CONTAINERD" != 1.6 ]] || return 0
    local differ=walking
    if [[ "$DIFF_PROXY" == 1 ]]; then
        differ=dedup-diff
        cat >>"$dir/containerd.toml" <<TOML

# Our Diff service on the same socket (containerd >= 1.7.4). A layer it answers Unimplemented to (mounts that are not
# ours) goes on to containerd's own walking differ.
[proxy_plugins.dedup-diff]
  type = "diff"
  address = "$dir/dedup.sock"

[plugins."io.containerd.service.v1.diff-service"]
  default = ["dedup-diff", "walking"]
TOML
    fi
    # The transfer service (ctr images pull; CRI in 2.x) unpacks only for the snapshotters listed, each with one
    # differ and no fall-through; listing any replaces the default entry (overlayfs), so it is listed too.
    cat >>"$dir/containerd.toml" <<TOML

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "dedup"
  differ = "$differ"

[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
  differ = "walking"
TOML
}

# Kubernetes' path (E2E_CRI=1): containerd's CRI plugin with our snapshotter and snapshot annotations on (as
# contrib/containerd-config*.toml), the pause image from this registry as the sandbox image, pods' CNI dirs inside DIR
# (the tests use host-network pods: no CNI plugin runs). CRI keeps its images and containers in namespace k8s.io.
# restrict_oom_score_adj: CRI gives sandboxes oom_score_adj -998, which a test machine without CAP_SYS_RESOURCE (a
# container or sandboxed VM) may not set; restricted, it never goes below containerd's own.
write_cri_config() {
    mkdir -p "$dir/cni/bin" "$dir/cni/conf"
    local sandbox="127.0.0.1:$port/pause:latest" # do_start's registry port
    if [[ "$CTRD_CONFIG_VERSION" == 3 ]]; then
        cat >>"$dir/containerd.toml" <<TOML

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "dedup"
  disable_snapshot_annotations = false
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$sandbox"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["$dir/cni/bin"]
  conf_dir = "$dir/cni/conf"
TOML
    else
        cat >>"$dir/containerd.toml" <<TOML

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$sandbox"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "dedup"
    disable_snapshot_annotations = false
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/conf"
TOML
    fi
    setenv E2E_CRI 1
}

start_snapshotter() {
    mkdir -p "$dir/snapshotter" "$logs"
    # shellcheck disable=SC2086 # the command is word-split on purpose
    setsid $SNAP_CMD >>"$logs/snapshotter.log" 2>&1 </dev/null &
    SNAP_PID=$!
    setenv E2E_SNAPSHOTTER_PID "$SNAP_PID"
    # The reference builds with Go on first use: allow for that.
    wait_for "snapshotter ($SNAP_CMD)" 300 "$SNAP_PID" test -S "$dir/dedup.sock"
}

ctr_() { ctr -a "$dir/containerd.sock" "$@"; }

snapshotter_answers() { # through containerd, which dials the proxy
    ctr_ -n "$E2E_NAMESPACE" snapshots --snapshotter dedup ls
}

do_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    local missing=""
    for b in containerd ctr runc docker-registry skopeo umoci ss; do command -v "$b" >/dev/null || missing+=" $b"; done
    [[ -z "$missing" ]] || die "missing:$missing: apt-get install -y containerd runc docker-registry skopeo umoci busybox-static debootstrap erofs-utils iproute2"
    [[ ! -f "$envf" ]] || die "$envf exists: stop the old environment first"
    mkdir -p "$logs"
    local default_cmd="$repo/target/release/dedup-snapshotter serve --root {root} --address {socket}"
    select_containerd
    parse_snapshotter_cmd "${3:-$default_cmd}"
    # ours on containerd >= 1.7: the Diff service dials containerd back for its content store
    if [[ "$E2E_CONTAINERD" != 1.6 && " $SNAP_CMD " == *" serve "* && " $SNAP_CMD " != *" --containerd"* ]]; then
        SNAP_CMD+=" --containerd $dir/containerd.sock"
    fi
    DIFF_PROXY=0
    if wants_diff_proxy; then DIFF_PROXY=1; fi
    setenv E2E_DIR "$dir"
    setenv E2E_CONTAINERD "$E2E_CONTAINERD"
    setenv E2E_CONTAINERD_VERSION "$CTRD_VERSION"
    setenv E2E_CONTAINERD_BIN "$CTRD_BIN"
    setenv E2E_CTR "$CTRD_BIN/ctr"
    setenv E2E_DIFF_PROXY "$DIFF_PROXY"
    setenv E2E_SNAPSHOTTER_CMD "$SNAP_CMD"
    setenv E2E_SNAPSHOTTER_FLAGS "$SNAP_FLAGS"
    setenv E2E_SNAPSHOTTER_ROOT "$dir/snapshotter"
    setenv E2E_SNAPSHOTTER_SOCK "$dir/dedup.sock"
    setenv E2E_CONTAINERD_SOCK "$dir/containerd.sock"
    E2E_NAMESPACE=e2e-$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '-')
    setenv E2E_NAMESPACE "$E2E_NAMESPACE"

    local images=${E2E_IMAGES:-/var/cache/dedup-snapshotter-tests/oci}
    "$here/build-test-images.sh" "$images"

    # registry (a port picked free may be taken by the time the registry binds it: up to 3 ports are tried)
    local port reg_pid try i up=0
    mkdir -p "$dir/registry"
    for try in 1 2 3; do
        port=$(free_port)
        cat >"$dir/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
        setsid docker-registry serve "$dir/registry.yml" >>"$logs/registry.log" 2>&1 </dev/null &
        reg_pid=$!
        setenv E2E_REGISTRY_PID "$reg_pid"
        for ((i = 0; i < 300; i++)); do
            if curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then up=1; break; fi
            alive "$reg_pid" || break
            sleep 0.1
        done
        ((up)) && break
        log "docker-registry on 127.0.0.1:$port did not come up (try $try): $(tail -n 3 "$logs/registry.log")"
        stop_pid docker-registry "$reg_pid"
    done
    ((up)) || die "docker-registry did not start (see $logs/registry.log)"
    setenv E2E_REGISTRY "127.0.0.1:$port"
    if [[ "$E2E_CONTAINERD" == 1.7 ]]; then start_tls_registry; fi

    # push the images (in parallel with the daemons starting up)
    local img push_pids=()
    for img in busybox layered minbase busybox-plus pause; do
        skopeo copy --quiet --insecure-policy --dest-tls-verify=false \
            "oci:$images/$img:latest" "docker://127.0.0.1:$port/$img:latest" >>"$logs/push-$img.log" 2>&1 &
        push_pids+=($!)
    done

    # snapshotter
    start_snapshotter

    # containerd
    write_containerd_config
    if [[ "${E2E_CRI:-0}" == 1 ]]; then write_cri_config; fi
    if [[ -n "${E2E_CONTAINERD_EXTRA:-}" ]]; then
        [[ -f "$E2E_CONTAINERD_EXTRA" ]] || die "E2E_CONTAINERD_EXTRA=$E2E_CONTAINERD_EXTRA is not a file"
        { echo; echo "# from E2E_CONTAINERD_EXTRA ($E2E_CONTAINERD_EXTRA)"; cat "$E2E_CONTAINERD_EXTRA"; } >>"$dir/containerd.toml"
    fi
    # only 1.7 gets it: its transfer service trusts the TLS registry's certificate (see start_tls_registry)
    if [[ "$E2E_CONTAINERD" == 1.7 ]]; then export SSL_CERT_FILE=$dir/tls/cert.pem; fi
    setsid containerd --config "$dir/containerd.toml" >>"$logs/containerd.log" 2>&1 </dev/null &
    unset SSL_CERT_FILE
    local ctrd_pid=$!
    setenv E2E_CONTAINERD_PID "$ctrd_pid"
    wait_for "containerd" 60 "$ctrd_pid" ctr_ version
    wait_for "snapshotter through containerd" 60 "$SNAP_PID" snapshotter_answers

    local names=(busybox layered minbase busybox-plus pause) i
    for i in "${!push_pids[@]}"; do
        wait "${push_pids[$i]}" || die "skopeo push of ${names[$i]} failed: $(cat "$logs/push-${names[$i]}.log")"
    done
    log "up: registry 127.0.0.1:$port, containerd $CTRD_VERSION ($dir/containerd.sock, diff proxy $DIFF_PROXY), snapshotter $dir/dedup.sock; env in $envf"
}

do_restart_snapshotter() {
    [[ -f "$envf" ]] || die "no $envf"
    # shellcheck disable=SC1090
    source "$envf"
    if [[ -n "${E2E_CONTAINERD_BIN:-}" ]]; then export PATH="$E2E_CONTAINERD_BIN:$PATH"; fi
    if alive "$E2E_SNAPSHOTTER_PID"; then die "snapshotter (pid $E2E_SNAPSHOTTER_PID) still runs"; fi
    SNAP_CMD=$E2E_SNAPSHOTTER_CMD
    if [[ " $E2E_SNAPSHOTTER_FLAGS " == *" rmsock "* ]]; then rm -f "$dir/dedup.sock"; fi
    echo "=== restart $(date +%T.%N) ===" >>"$logs/snapshotter.log"
    start_snapshotter
    wait_for "restarted snapshotter through containerd" 60 "$SNAP_PID" snapshotter_answers
    log "snapshotter restarted (pid $SNAP_PID)"
}

stop_pid() { # NAME PID: SIGTERM, wait up to 10 s, SIGKILL
    local name=$1 pid=${2:-} i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$pid" || return 0; sleep 0.1; done
    log "$name (pid $pid) ignored SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || return 0; sleep 0.1; done
}

mounts_under() { # prints mount points under $dir, deepest (most recently mounted) first
    # mountinfo field 5 is the mount point with space, tab, newline, backslash as octal escapes.
    awk -v d="$dir/" '{ p = $5; gsub(/\\040/, " ", p); gsub(/\\011/, "\t", p); gsub(/\\134/, "\\", p);
        if (index(p, d) == 1) print length(p) "\t" NR "\t" p }' /proc/self/mountinfo |
        sort -t$'\t' -k1,1nr -k2,2nr | cut -f3-
}

do_stop() {
    local rc=0
    if [[ -f "$envf" ]]; then
        # shellcheck disable=SC1090
        source "$envf"
        if [[ -n "${E2E_CONTAINERD_BIN:-}" ]]; then export PATH="$E2E_CONTAINERD_BIN:$PATH"; fi
        if alive "${E2E_CONTAINERD_PID:-}"; then
            local ns t
            for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
                for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
                    ctr_ -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
                done
                for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
                    timeout 20 ctr_ -n "$ns" tasks rm -f "$t" >/dev/null 2>&1 || true
                done
                for t in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
                    timeout 20 ctr_ -n "$ns" containers rm "$t" >/dev/null 2>&1 || true
                done
            done
        fi
        stop_pid containerd "${E2E_CONTAINERD_PID:-}"
        stop_pid snapshotter "${E2E_SNAPSHOTTER_PID:-}"
        stop_pid docker-registry "${E2E_REGISTRY_PID:-}"
        stop_pid docker-registry "${E2E_REGISTRY_TLS_PID:-}"
        # shims our containerd started (they outlive it): found by their -address argument
        # (a shim exits on its own shortly after its last task is deleted; give it a moment)
        local p shims i
        for ((i = 0; i < 30; i++)); do
            shims=""
            for p in /proc/[0-9]*; do
                if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "containerd-shim.*-address $dir/containerd.sock "; then
                    shims+=" ${p#/proc/}"
                fi
            done
            [[ -n "$shims" ]] || break
            sleep 0.1
        done
        for p in $shims; do
            log "killing leftover shim $p"
            kill -KILL "$p" 2>/dev/null || true
        done
    fi
    local m left
    for _ in 1 2 3; do
        while IFS= read -r m; do
            [[ -n "$m" ]] || continue
            umount -l "$m" 2>/dev/null || umount -l -- "$m" || true
        done < <(mounts_under)
        [[ -z "$(mounts_under)" ]] && break
        sleep 0.2
    done
    left=$(mounts_under)
    if [[ -n "$left" ]]; then
        log "still mounted under $dir:"$'\n'"$left"
        rc=1
    fi
    [[ -f "$envf" ]] && mv -f "$envf" "$envf.stopped"
    return $rc
}

case "$cmd" in
start) do_start "$@" ;;
restart-snapshotter) do_restart_snapshotter ;;
stop) do_stop ;;
*) die "unknown command $cmd (start|restart-snapshotter|stop)" ;;
esac
