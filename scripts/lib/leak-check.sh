#!/usr/bin/env bash
# What the tests left behind: mounts and processes that were not there before them.
#
# usage: leak-check.sh snapshot STATE_DIR   records what is mounted and running now (before the tests) in STATE_DIR
#                                           and prints a run marker for the caller to export as DEDUP_LEAK_MARK
#        leak-check.sh check STATE_DIR      compares with now: lists each leftover on stderr, cleans them up (lazy
#                                           unmount, deepest first; SIGTERM then SIGKILL), prints one pseudo-test line
#                                           on stdout for the summary ("    --- PASS: leak-check" or
#                                           "    --- FAIL: leak-check (...)") and exits 1 if anything was left
#
# scripts/test.sh takes the snapshot right before `cargo test` and checks after the conformance suite.
#
# A leftover mount is one not in the snapshot (same mount id, point, type and source) that is
#   - at or under /tmp/, /var/tmp/ (tempfile's .tmp*, e2e.*, crash.*, dedupd.*, the Go suite's temp dirs ...) or the
#     test cache ${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}/, or
#   - of type erofs, overlay or fuse* (dedupd's FUSE mount is fuse.dedupd) anywhere.
# A leftover process is one not in the snapshot (pid and start time) that
#   - carries this run's marker in its environment (DEDUP_LEAK_MARK=<marker>, exported before `cargo test`: every
#     process the tests start inherits it, containerd's shims included), or
#   - runs chrooted into a directory under /tmp/, /var/tmp/ or the test cache (a container the tests started).
# New processes named like the tests' (containerd, containerd-shim*, runc, docker-registry, dedup-snapshotter, dedupd,
# registry-proxy, the Go harnesses suite/suite2/diffclient/reference) that lack the marker are only reported: they
# may belong to another run on the same machine and are left alone.
#
# Caveat: mounts cannot be traced to the run that made them; another run mounting under /tmp on the same machine at
# the same time shows up here (and is unmounted). LEAK_CHECK_CLEAN=0 reports without cleaning anything.
set -uo pipefail

CACHE=${DEDUP_CACHE:-/var/cache/dedup-snapshotter-tests}
NAMES='^(containerd|containerd-shim.*|runc|docker-registry|dedup-snapshotter|dedupd|registry-proxy|suite|suite2|diffclient|reference)$'

log() { printf 'leak-check: %s\n' "$*" >&2; }

# mountinfo as "id<TAB>point<TAB>fstype<TAB>source" with point and source unescaped (\040 etc.).
mounts() {
    awk '
        function unesc(s,   out, i) {
            out = ""
            while ((i = match(s, /\\[0-7][0-7][0-7]/)) > 0) {
                out = out substr(s, 1, i - 1) sprintf("%c", substr(s, i + 1, 1) * 64 + substr(s, i + 2, 1) * 8 + substr(s, i + 3, 1))
                s = substr(s, i + 4)
            }
            return out s
        }
        {
            for (sep = 7; sep <= NF && $sep != "-"; sep++) {}
            printf "%s\t%s\t%s\t%s\n", $1, unesc($5), $(sep + 1), unesc($(sep + 2))
        }
    ' /proc/self/mountinfo
}

# "pid<TAB>starttime" of every process (starttime: field 22 of /proc/PID/stat, after the parenthesised comm).
processes() {
    local d stat rest
    for d in /proc/[0-9]*; do
        stat=$(cat "$d/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086 # split into fields on purpose
        set -- $rest
        printf '%s\t%s\n' "${d#/proc/}" "${20}"
    done
}

# The start time of a live (not zombie) process.
starttime() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    [[ $1 != Z ]] || return 1
    echo "${20}"
}

pname() {
    local exe
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) && exe=${exe% (deleted)} && [[ -n $exe ]] && {
        basename "$exe"
        return
    }
    cat "/proc/$1/comm" 2>/dev/null || echo '?'
}

# Whether PID is this script or one of its descendants.
is_self() {
    local p=$1 stat rest
    for _ in $(seq 32); do
        [[ $p == "$$" ]] && return 0
        [[ $p -le 1 ]] && return 1
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || return 1
        rest=${stat##*) }
        # shellcheck disable=SC2086
        set -- $rest
        p=$2
    done
    return 1
}

pcmd() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | cut -c1-160; }

under_watched() {
    case "$1" in
    /tmp/* | /var/tmp/* | "$CACHE"/*) return 0 ;;
    esac
    return 1
}

# Top-level entries of /tmp and /var/tmp: a leftover mount's directory is removed after cleanup only if it is new.
tmp_entries() { find /tmp /var/tmp -mindepth 1 -maxdepth 1 2>/dev/null | sort; }

snapshot() {
    local dir=$1
    mkdir -p "$dir" || exit 1
    mounts >"$dir/mounts"
    processes >"$dir/processes"
    tmp_entries >"$dir/tmp"
    local mark
    mark=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
    echo "$mark" >"$dir/mark"
    echo "$mark"
}

check() {
    local dir=$1
    [[ -f $dir/mounts && -f $dir/processes && -f $dir/mark ]] || {
        log "no snapshot in $dir (run '$0 snapshot $dir' before the tests)"
        echo "    --- FAIL: leak-check (no snapshot taken before the tests)"
        return 1
    }
    local mark
    mark=$(cat "$dir/mark")

    # --- mounts ---
    local -a leaked=()
    local id point fstype source
    while IFS=$'\t' read -r id point fstype source; do
        [[ $point == /tmp || $point == /var/tmp ]] && continue
        if under_watched "$point" || [[ $fstype == erofs || $fstype == overlay || $fstype == fuse* ]]; then
            leaked+=("$id"$'\t'"$point"$'\t'"$fstype"$'\t'"$source")
        fi
    done < <(mounts | grep -vxFf "$dir/mounts")

    # --- processes ---
    local -a stray=() others=()
    local pid st name root now
    now=$(processes | grep -vxFf "$dir/processes")
    while IFS=$'\t' read -r pid st; do
        [[ -n $pid ]] || continue
        # This script, its subprocesses and the shell that runs it (test.sh exported the marker) are not leftovers.
        [[ $pid == "$PPID" ]] && continue
        is_self "$pid" && continue
        [[ $(starttime "$pid") == "$st" ]] || continue # gone meanwhile
        name=$(pname "$pid")
        root=$(readlink "/proc/$pid/root" 2>/dev/null || echo /)
        if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "DEDUP_LEAK_MARK=$mark" ||
            { [[ $root != / ]] && under_watched "$root/"; }; then
            stray+=("$pid"$'\t'"$st"$'\t'"$name")
        elif [[ $name =~ $NAMES ]]; then
            others+=("$pid $name: $(pcmd "$pid")")
        fi
    done <<<"$now"

    if ((${#others[@]})); then
        log "new processes named like the tests' but without this run's marker (another run's?), left alone:"
        printf '  %s\n' "${others[@]}" >&2
    fi
    if ((${#leaked[@]} == 0 && ${#stray[@]} == 0)); then
        log "nothing left mounted or running"
        echo "    --- PASS: leak-check"
        return 0
    fi
    if ((${#leaked[@]})); then
        log "${#leaked[@]} mount(s) the tests left behind:"
        local m
        for m in "${leaked[@]}"; do
            IFS=$'\t' read -r id point fstype source <<<"$m"
            printf '  %s (%s from %s)\n' "$point" "$fstype" "$source" >&2
        done
    fi
    if ((${#stray[@]})); then
        log "${#stray[@]} process(es) the tests left running:"
        local p
        for p in "${stray[@]}"; do
            IFS=$'\t' read -r pid st name <<<"$p"
            printf '  %s %s: %s\n' "$pid" "$name" "$(pcmd "$pid")" >&2
        done
    fi
    echo "    --- FAIL: leak-check (${#leaked[@]} mounts, ${#stray[@]} processes left behind)"

    if [[ ${LEAK_CHECK_CLEAN:-1} == 0 ]]; then
        log "LEAK_CHECK_CLEAN=0: nothing cleaned"
        return 1
    fi
    # Processes first (a daemon may hold or re-make mounts): SIGTERM, 5 s, SIGKILL; only if the pid is still the
    # same process (same start time).
    if ((${#stray[@]})); then
        for p in "${stray[@]}"; do
            IFS=$'\t' read -r pid st name <<<"$p"
            [[ $(starttime "$pid") == "$st" ]] && kill -TERM "$pid" 2>/dev/null
        done
        for _ in $(seq 50); do
            local alive=0
            for p in "${stray[@]}"; do
                IFS=$'\t' read -r pid st name <<<"$p"
                [[ $(starttime "$pid") == "$st" ]] && alive=1
            done
            ((alive)) || break
            sleep 0.1
        done
        for p in "${stray[@]}"; do
            IFS=$'\t' read -r pid st name <<<"$p"
            [[ $(starttime "$pid") == "$st" ]] && kill -KILL "$pid" 2>/dev/null && log "killed $pid ($name) with SIGKILL"
        done
    fi
    # Mounts: lazily, deepest mount point first, later mounts of a stacked point first; again while that helps.
    if ((${#leaked[@]})); then
        local left
        for _ in 1 2 3 4 5; do
            left=$(mounts | grep -xFf <(printf '%s\n' "${leaked[@]}"))
            [[ -z $left ]] && break
            # depth<TAB>line number<TAB>point, deepest and latest first
            awk -F'\t' '{ n = gsub("/", "/", $2); print n "\t" NR "\t" $2 }' <<<"$left" |
                sort -t$'\t' -k1,1nr -k2,2nr | cut -f3- |
                while IFS= read -r point; do umount -l -- "$point" 2>/dev/null; done
        done
        left=$(mounts | grep -xFf <(printf '%s\n' "${leaked[@]}"))
        if [[ -n $left ]]; then
            log "could not unmount:"
            cut -f2,3 <<<"$left" | sed 's/^/  /' >&2
        else
            log "unmounted them"
            # The tests' temp dirs that held them, if they are new and nothing is mounted under them any more.
            local top
            for m in "${leaked[@]}"; do
                IFS=$'\t' read -r id point fstype source <<<"$m"
                case "$point" in
                /tmp/?*) top=$(cut -d/ -f1-3 <<<"$point") ;;
                /var/tmp/?*) top=$(cut -d/ -f1-4 <<<"$point") ;;
                *) continue ;;
                esac
                grep -qxF "$top" "$dir/tmp" 2>/dev/null && continue
                [[ -d $top ]] || continue
                mounts | cut -f2 | awk -v t="$top" 'index($0, t "/") == 1 || $0 == t { f = 1 } END { exit !f }' &&
                    continue
                rm -rf --one-file-system -- "$top" && log "removed $top"
            done
        fi
    fi
    return 1
}

case "${1:-}" in
snapshot) snapshot "${2:?usage: leak-check.sh snapshot STATE_DIR}" ;;
check) check "${2:?usage: leak-check.sh check STATE_DIR}" ;;
*)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
