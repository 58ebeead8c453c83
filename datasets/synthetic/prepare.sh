#!/usr/bin/env bash
# Write the synthetic world's image shards (train/val/test) with `vlpt data synth`.
#   datasets/synthetic/prepare.sh [OUT_DIR] [extra `vlpt data synth` options...]
# Defaults: 20,000 train, 1,000 val, 1,000 test images of 64x64 px, seed 0, all cores.
# Add --video for the video clips too (OUT_DIR/video/{train,val,test}, 20,000/1,000/1,000 clips).
set -euo pipefail

out_dir="${1:-data/synthetic}"
shift || true

vlpt data synth "$out_dir" --seed 0 --images 20000 --val 1000 --test 1000 --size 64 "$@"
