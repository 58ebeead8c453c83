#!/usr/bin/env bash
# Convert COCO captions (Karpathy splits) into image shards with `vlpt data convert karpathy`.
#   datasets/coco/prepare.sh COCO_DIR [OUT_DIR] [extra `vlpt data convert karpathy` options...]
# COCO_DIR holds dataset_coco.json, val2014/ and train2014/ (see README.md; nothing is
# downloaded here). Default: every split, restval folded into train, into data/coco.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: datasets/coco/prepare.sh COCO_DIR [OUT_DIR] [options]" >&2
    exit 2
fi
coco_dir="$1"
out_dir="data/coco"
shift
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    out_dir="$1"
    shift
fi

vlpt data convert karpathy "$out_dir" \
    --annotations "$coco_dir/dataset_coco.json" --images "$coco_dir" --restval-into-train "$@"
