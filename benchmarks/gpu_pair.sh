#!/usr/bin/env bash
# Two lists of gpu_session.sh stages side by side on a two-GPU machine (nvidia-h200-x2): list A on GPU 0, list B on
# GPU 1, each with its own output folder, both cut at PAIR_CAP seconds (default 560, so that one device call of at
# most 600 s always comes back with the archive), then one archive of both folders in $OUT/pair.tgz (the device tool
# brings back only a few files a call, none from deep folders).
#
#   bash benchmarks/gpu_pair.sh "fla-decode" "decode"          # carry .whl and .cache/triton for FLA
#   bash benchmarks/gpu_pair.sh "fla" "tests tests-gpu"         # several stages on one GPU run in turn
#
# Both sides get the same environment (SHAPES, BUDGET, ...). The waiting is plain `wait` on the two children: no
# process search by name (a `pgrep -f` pattern also matches the shell that runs the device call's own command).
set -uo pipefail
if [ $# -ne 2 ]; then
    echo "usage: gpu_pair.sh \"STAGES ON GPU 0\" \"STAGES ON GPU 1\"" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/gpu-out}"
work="$(mktemp -d /tmp/gpu-pair.XXXXXX)"
mkdir -p "$OUT" "$work/a" "$work/b"
side() {  # side GPU FOLDER STAGES
    CUDA_VISIBLE_DEVICES=$1 OUT="$work/$2" timeout --signal=INT --kill-after=15 "${PAIR_CAP:-560}" \
        bash "$here/gpu_session.sh" $3 > "$work/$2/session.log" 2>&1
    echo "=== GPU $1 ($3) exit $? $(date +%T)" >> "$work/$2/session.log"
}
side 0 a "$1" &
side 1 b "$2" &
wait
tail -n 40 "$work/a/session.log" "$work/b/session.log"
tar -czf "$OUT/pair.tgz" -C "$work" .
echo "wrote $OUT/pair.tgz"
