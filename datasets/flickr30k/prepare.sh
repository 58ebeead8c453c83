#!/usr/bin/env bash
# Convert Flickr30k (Karpathy splits) into image shards with `vlpt data convert karpathy`.
#   datasets/flickr30k/prepare.sh FLICKR_DIR [OUT_DIR] [extra `vlpt data convert karpathy` options...]
# FLICKR_DIR holds dataset_flickr30k.json and flickr30k-images/ (see README.md; nothing is
# downloaded here). Default: train, val and test into data/flickr30k.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: datasets/flickr30k/prepare.sh FLICKR_DIR [OUT_DIR] [options]" >&2
    exit 2
fi
flickr_dir="$1"
out_dir="data/flickr30k"
shift
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    out_dir="$1"
    shift
fi

vlpt data convert karpathy "$out_dir" \
    --annotations "$flickr_dir/dataset_flickr30k.json" --images "$flickr_dir/flickr30k-images" "$@"
