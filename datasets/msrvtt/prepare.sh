#!/usr/bin/env bash
# Convert MSR-VTT into video shards (train, val, test and the 1k-A test1k) with
# `vlpt data convert msrvtt`.
#   datasets/msrvtt/prepare.sh MSRVTT_DIR [OUT_DIR] [extra `vlpt data convert msrvtt` options...]
# MSRVTT_DIR holds msrvtt_data/ (CLIP4Clip's msrvtt_data.zip) and MSRVTT/videos/all/ (Frozen in
# Time's MSRVTT.zip); see README.md, nothing is downloaded here. Default OUT_DIR: data/msrvtt.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: datasets/msrvtt/prepare.sh MSRVTT_DIR [OUT_DIR] [options]" >&2
    exit 2
fi
msrvtt_dir="$1"
out_dir="data/msrvtt"
shift
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    out_dir="$1"
    shift
fi

vlpt data convert msrvtt "$out_dir" \
    --annotations "$msrvtt_dir/msrvtt_data/MSRVTT_data.json" \
    --annotations "$msrvtt_dir/msrvtt_data/MSRVTT_JSFUSION_test.csv" \
    --videos "$msrvtt_dir/MSRVTT/videos/all" "$@"
