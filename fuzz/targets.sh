# The fuzz targets and their seeds, for fuzz/run.sh and scripts/fuzz-smoke.sh (sourced).
FUZZ_TARGETS=(erofs_image tar_convert tar_reader lazy_layer filters compressed tar_index)

# fuzz_seeds TARGET: sets `seeds` (dir under fuzz/) and `len` (libFuzzer's -max_len).
fuzz_seeds() {
    case $1 in
        tar_reader|tar_convert) seeds=seeds/tar; len=65536 ;;
        erofs_image) seeds=seeds/erofs_image; len=65536 ;;
        *) seeds=seeds/$1; len=4096 ;;
    esac
}
