# Sourced (with no arguments) by the bench scripts, after `cd "$ROOT"`: parses the
# options they share from the caller's own arguments and shifts them away.
#   -n REPS   repetitions, median reported (default $BENCH_REPS, else 3)
#   -h        prints the calling script's header comment
# shellcheck shell=bash
REPS=${BENCH_REPS:-3}
while getopts "n:h" opt; do
    case $opt in
    n) REPS=$OPTARG ;;
    *)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 2
        ;;
    esac
done
shift $((OPTIND - 1))
[[ $REPS =~ ^[1-9][0-9]*$ ]] || {
    echo "$(basename "$0"): -n wants a positive number" >&2
    exit 2
}
