# Sourced by the bench scripts that run a private containerd environment (scripts/e2e-env.sh) in ENV_DIR, after
# `cd "$ROOT"` and with log() defined: the clean-up trap, the clock, and the in-container timing helper.
#   bench_setup RAWNAME     checks root and the tools, makes BENCH_DIR (default target/bench), sets RAW to
#                           BENCH_DIR/RAWNAME, builds the release binary unless BENCH_NO_BUILD is set
#   bench_env_trap          installs the EXIT/INT/TERM trap: stops the environment, prints the logs' tails on
#                           failure, removes ENV_DIR unless something is still mounted there (and, when LOOP_IMG is
#                           set, unmounts the loop file system ENV_DIR lives on and deletes its image)
#   bench_timeit            builds the static timing helper at $ENV_DIR/timeit and sets TIMEIT
#   now, since T            wall clock (seconds since the epoch), seconds since T
#   snapshots_of SNAP       `ctr snapshots ls` of a snapshotter, without the header (needs ctr_)
#   dir_entries DIR         the first entry of DIR (nothing when DIR is empty or missing)
#   names_in DIR            DIR's entries on one line
#   read_all SNAP REF ID    reads every file of REF's image in a container; prints the inside-the-container seconds
#                           (needs ctr_ and TIMEIT)
# shellcheck shell=bash

bench_setup() {
    [[ $(id -u) -eq 0 ]] || {
        log "must run as root (containerd, mounts, drop_caches)"
        exit 1
    }
    local b
    for b in ctr containerd runc python3 rustc du; do
        command -v "$b" >/dev/null || {
            log "$b missing (apt-get install -y containerd runc python3; rustc from rustup)"
            exit 1
        }
    done
    BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench}
    mkdir -p "$BENCH_DIR"
    BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
    # shellcheck disable=SC2034 # used by the scripts that source this file
    RAW=$BENCH_DIR/$1
    if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
        log "cargo build --release -p dedup-snapshotter"
        cargo build --release -q -p dedup-snapshotter --bin dedup-snapshotter
    fi
}

bench_env_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -f "$ENV_DIR/env" ]]; then
        if ! "$ROOT/scripts/e2e-env.sh" stop "$ENV_DIR" >"$ENV_DIR/stop.log" 2>&1; then
            log "e2e-env.sh stop failed, $ENV_DIR kept: $(cat "$ENV_DIR/stop.log")"
            exit $((rc ? rc : 1))
        fi
    fi
    if ((rc)) && [[ -d "$ENV_DIR/logs" ]]; then
        log "failed; last lines of the logs:"
        tail -n 20 "$ENV_DIR"/logs/*.log >&2 || true
    fi
    if awk -v d="$ENV_DIR/" 'index($5, d) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        log "still mounted under $ENV_DIR; kept"
    else
        if [[ -n ${LOOP_IMG:-} ]]; then
            if mountpoint -q "$ENV_DIR"; then umount "$ENV_DIR"; fi
            rm -f "$LOOP_IMG"
        fi
        rm -rf "$ENV_DIR"
    fi
    exit "$rc"
}

bench_env_trap() {
    trap bench_env_cleanup EXIT
    trap 'exit 130' INT TERM
}

# The timing helper: runs its arguments, prints the elapsed nanoseconds on stdout.  Static, so it runs in any image.
bench_timeit() {
    cat >"$ENV_DIR/timeit.rs" <<'RS'
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t = std::time::Instant::now();
    let st = std::process::Command::new(&args[0]).args(&args[1..]).status().expect("spawn");
    println!("timeit_ns={}", t.elapsed().as_nanos());
    std::process::exit(st.code().unwrap_or(1));
}
RS
    rustc -O -C target-feature=+crt-static -o "$ENV_DIR/timeit" "$ENV_DIR/timeit.rs" || {
        log "cannot build the static timing helper (needs libc6-dev for libc.a)"
        exit 1
    }
    TIMEIT=$ENV_DIR/timeit
}

snapshots_of() { ctr_ snapshots --snapshotter "$1" ls | tail -n +2; }
dir_entries() { # DIR: prints the first entry of DIR (nothing when DIR is empty or missing)
    if [[ -d "$1" ]]; then find "$1" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n 1; fi
}
names_in() { if [[ -d "$1" ]]; then find "$1" -mindepth 1 -maxdepth 1 -printf '%f '; fi; }

now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }'; }

READ_ALL='find / -xdev -type f ! -path /.bench-timeit -exec cat {} + >/dev/null'

read_all() { # SNAPSHOTTER REF ID: prints the inside-the-container seconds
    local out ns
    out=$(ctr_ run --rm --snapshotter "$1" \
        --mount "type=bind,src=$TIMEIT,dst=/.bench-timeit,options=rbind:ro" \
        "$2" "$3" /.bench-timeit /bin/sh -c "$READ_ALL") || {
        log "read-all in $3 failed: $out"
        exit 1
    }
    ns=$(sed -n 's/^timeit_ns=//p' <<<"$out" | tail -n 1)
    [[ -n "$ns" ]] || {
        log "no timing from $3: $out"
        exit 1
    }
    awk -v n="$ns" 'BEGIN { printf "%.4f", n / 1e9 }'
}
