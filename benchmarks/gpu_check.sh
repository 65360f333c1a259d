#!/usr/bin/env bash
# An acceptance check and benchmark for a GPU node: run it on the node (one CUDA GPU is used), from
# the repository root, to check the install end to end and measure throughput. The node needs no
# network: Snakemake, pytorch-fid and the FID Inception weights come from the wheelhouse .whl/ that
# benchmarks/fetch_wheels.sh fills where pip works; Python, torch and torchvision are the node's.
#
#     bash benchmarks/gpu_check.sh            # results in the folder $OUT (default ./gpu_check_out)
#     bash benchmarks/gpu_check.sh --tiny     # the same steps on a CPU at toy sizes (GPU_CHECK_TINY=1)
#
# Steps, in order, each with its own time limit and output file (written as it goes, so a timeout
# keeps what finished); summary.txt gets one line per step (exit status, seconds):
#   a_env.txt        GPU, driver, torch, CUDA
#   b_pytest.txt     python -m pytest -m gpu
#   c_rehearsal.txt  the CIFAR-100 stages at full size in bf16 (benchmarks/gpu_check.py)
#   d_sampler.txt    sampler throughput table, S/2 and M/4 (benchmarks/sampler_throughput.py)
#   e_finetune.txt   fine-tuning throughput (benchmarks/finetune_throughput.py)
#   f_evaluator.txt  evaluator against the organisers' loop (benchmarks/evaluator_speed.py)
# The limits add up to 540 s; with the wheel install and the dry run the check takes about 9 minutes.
# Also read: GPU_CHECK_WORK (scratch folder, default /tmp/gpu_check), PYTHON (default python3).
set -u
cd "$(dirname "$0")/.."
TINY=${GPU_CHECK_TINY:-0}
[ "${1:-}" = "--tiny" ] && TINY=1
export GPU_CHECK_TINY=$TINY
OUT=${OUT:-$PWD/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# GPU_CHECK_WHEELS=1 with --tiny: install and use the wheelhouse as the full check does (the whole
# script checked on a CPU, e.g. under a Python with the node's Python and torch versions).
WHEELS=${GPU_CHECK_WHEELS:-0}
[ "$TINY" != 1 ] && WHEELS=1
if [ "$TINY" != 1 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here; nothing was run (use --tiny on a CPU)" | tee "$OUT/summary.txt"
    exit 3
fi
if [ "$WHEELS" = 1 ]; then
    if ! ls .whl/pytorch_fid-*.whl .whl/snakemake-*.whl .whl/inception_fid_fp16.pt >/dev/null 2>&1; then
        echo "gpu_check: .whl/ lacks the wheels or the Inception weights: run 'bash benchmarks/fetch_wheels.sh' where pip works and copy .whl/ here" | tee "$OUT/summary.txt"
        exit 4
    fi
    SITE=$WORK/site
    if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            >"$OUT/install.log" 2>&1; then
        echo "gpu_check: installing .whl/*.whl failed (install.log)" | tee "$OUT/summary.txt"
        exit 5
    fi
    # PYTHONPATH comes before site-packages: fetch_wheels.sh leaves out what the node's environment
    # is expected to have, so that nothing here shadows the node's own versions.
    export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH"
fi

# per-step time limits (s), so that a slow or hung step cannot hold up the rest
if [ "$TINY" = 1 ]; then  # one thread: small work on a busy CPU gains nothing from more
    export OMP_NUM_THREADS=1
    TESTS=tests/test_uvit.py
    [ "$WHEELS" = 1 ] && TESTS=tests  # as on the GPU: every test module collected
    LIMITS=(300 300 300 300 300 300)
else
    TESTS=tests
    LIMITS=(20 75 190 105 80 70)
fi
NAMES=(a_env b_pytest c_rehearsal d_sampler e_finetune f_evaluator)
STEPS=(env pytest rehearsal sampler finetune evaluator)
: >"$OUT/summary.txt"
status=0
for i in "${!NAMES[@]}"; do
    began=$(date +%s.%N)
    if [ "${STEPS[$i]}" = pytest ]; then
        # The quick GPU tests first, then the slow ones (torch.compile), so that a time limit cuts only
        # those; pytest's 5 ("no tests selected") counts as success. One process (-o addopts): the
        # node's pytest may have no pytest-xdist, and the GPU tests share one device.
        timeout -k 5 "${LIMITS[$i]}" bash -c 'for m in "gpu and not slow" "gpu and slow"; do
                "$0" -m pytest -q -p no:cacheprovider -o addopts=-ra -m "$m" "$1"; rc=$?
                [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && failed=1; done; exit ${failed:-0}' "$PY" "$TESTS" \
            >"$OUT/${NAMES[$i]}.txt" 2>&1
    else
        timeout -k 5 "${LIMITS[$i]}" $PY benchmarks/gpu_check.py --step "${STEPS[$i]}" --work "$WORK" \
            >"$OUT/${NAMES[$i]}.txt" 2>&1
    fi
    rc=$?
    [ "$rc" -ne 0 ] && status=1
    seconds=$($PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$began" "$(date +%s.%N)")
    note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (time limit ${LIMITS[$i]} s: partial)"
    echo "${NAMES[$i]}: rc $rc, ${seconds} s${note}" | tee -a "$OUT/summary.txt"
done
R=$WORK/rehearsal
if [ "$WHEELS" = 1 ] && [ -f "$R/cifar10_uvit_small.pth" ] && $PY -c "import snakemake" 2>/dev/null; then
    # The workflow's wiring of the paper config on this machine, over the rehearsal's files: a dry run.
    printf 'device: cuda\nresults: %s\ndata: {root: %s, download: false}\npretrained: {source: file, path: %s}\n' \
        "$WORK/smk" "$R/raw" "$R/cifar10_uvit_small.pth" >"$WORK/paths.yaml"
    [ -f "$R/inception_fid.pth" ] && echo "scoring: {inception_weights: $R/inception_fid.pth}" >>"$WORK/paths.yaml"
    if $PY -m snakemake -n -q --cores 16 --configfile config/cifar100.yaml "$WORK/paths.yaml" >"$WORK/dryrun.txt" 2>&1; then
        echo "snakemake dry run of config/cifar100.yaml: ok ($(grep -c . "$WORK/dryrun.txt") lines)" | tee -a "$OUT/summary.txt"
    else
        echo "snakemake dry run of config/cifar100.yaml failed: $(tail -3 "$WORK/dryrun.txt" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
    fi
fi
exit $status
