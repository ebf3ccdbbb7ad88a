#!/usr/bin/env bash
# The CUDA paths, run on a machine with one GPU, in one pass:
#   - the GPU-marked tests (a CUDA build equals the CPU build; exact sums on CUDA; pinned batches);
#   - `actindex demo --device cuda`: build, neuron sheets, filters, dream, similarity and the atlas on the GPU;
#   - crash and resume on CUDA under torchrun, compared dataset for dataset with an uninterrupted CUDA build;
#   - torchrun with more processes than GPUs: the one-line refusal;
#   - the atlas of every unit of the demo index on the GPU with 8 worker processes, against a few units on the
#     CPU in the same run (seconds per unit);
#   - scripts/bench_query.py and scripts/bench_dream.py with --device cuda;
#   - scripts/bench_index.py: the indexing step against the bare forward pass, with the score histograms (issue 15);
#   - decoders and precisions (issue 14): a --decoder gpu --precision bf16 build queried on CUDA and on the CPU,
#     crashed and resumed under torchrun against one uninterrupted process, and scripts/bench_decode.py's fidelity and end-to-end modes
#     (bare forward vs today's build vs the GPU-decode build, resnet18/resnet50/demo at fp32 and bf16).
#   - patch search (issue 17): the crash/resume builds keep --patch-layer blocks.4 (compared bit for bit), a patch
#     search with --explain on cuda, and bench_index's cost of writing resnet50 layer4's patch vectors.
#   - dreams (issue 18): scripts/bench_featurevis.py on cuda (Fourier and pixel dreams, and lucent's if installed).
# Usage, from the repository root with actindex installed (ACTINDEX names the command, PYTHON the interpreter):
#   bash scripts/gpu_check.sh WORKDIR
set -uo pipefail
work=${1:?usage: gpu_check.sh WORKDIR}
PYTHON=${PYTHON:-python3}
ACTINDEX=${ACTINDEX:-actindex}
mkdir -p "$work"
step() { echo; echo "=== $* ($(date +%T))"; }
seconds() { local t0=$SECONDS; "$@"; local rc=$?; echo "[${*:1:2}…: $((SECONDS - t0)) s, exit $rc]"; }
same_index() {  # A B LABEL: every dataset of two indexes equal bit for bit
    $PYTHON - "$1" "$2" "$3" <<'EOF'
import sys, h5py, numpy as np
def datasets(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out
a, b = datasets(sys.argv[1]), datasets(sys.argv[2])
bad = [k for k in a if k not in b or not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")]
print(f"{sys.argv[3]}, every dataset bit for bit:", a.keys() == b.keys() and not bad, bad[:5])
EOF
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "GPU tests"
$PYTHON -m pytest -q -m gpu -p no:cacheprovider tests/test_build.py tests/test_images.py tests/test_exact_sum.py \
    tests/test_decode.py

step "demo on cuda"
seconds $ACTINDEX demo --device cuda --out "$work/demo" | grep -v "^  unit\|^$" | tail -25

step "crash and resume on cuda under torchrun (1 process) vs an uninterrupted cuda build"
data="$work/demo/images"
common=(--model timm:efficientnet_lite0 --weights "$work/demo/efficientnet_lite0.safetensors" --batch-size 16
        --layers blocks.2,blocks.4,conv_head --k 6 --device cuda --checkpoint-every 64 --faiss-factory none
        --patch-layer blocks.4)
$ACTINDEX build "$data" --out "$work/plain.h5" "${common[@]}" 2>&1 | tail -1
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/resumed.h5" \
    "${common[@]}" --crash-at 0:100:raise 2>&1 | grep -i "error\|resume" | head -3
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/resumed.h5" \
    "${common[@]}" --resume 2>&1 | tail -2
same_index "$work/plain.h5" "$work/resumed.h5" "resumed == uninterrupted"

step "two processes on one GPU"
torchrun --standalone --nproc_per_node=2 "$(command -v "$ACTINDEX")" build "$data" --out "$work/two.h5" \
    "${common[@]}" 2>&1 | grep -i "error" | head -2

step "atlas: every unit on cuda (8 jobs) vs 4 units per layer on the cpu"
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cpu" --units 0-3 --device cpu | tail -1
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cuda" --device cuda --jobs 8 --batch-size 64 \
    | tail -2
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cuda1" --device cuda --jobs 1 --batch-size 64 \
    | tail -2

step "bench_index cuda (b/a with the score histograms; it was 0.940 on an H100 before them)"
$PYTHON scripts/bench_index.py --device cuda --batch-size 256 --batches 32 --rounds 5 --memory-images 2048 --jpegs 0 \
    | tail -12
step "bench_index cuda with class sums (1 000 classes) and --bottom-k 9, against the accumulator without them"
$PYTHON scripts/bench_index.py --device cuda --batch-size 256 --batches 32 --rounds 5 --memory-images 2048 --jpegs 0 \
    --classes 1000 --bottom-k 9 | tail -14
step "unit profiles and attribution methods on cuda: unit, neuron --lowest, every method with --sanity"
$ACTINDEX unit "$work/demo/index.h5" --layer classifier --unit 285 --k 3
$ACTINDEX neuron "$work/demo/index.h5" --layer classifier --unit 285 --lowest --device cuda --out "$work/low.png" \
    | head -3
seconds $ACTINDEX neuron "$work/demo/index.h5" --layer blocks.4 --unit 45 --device cuda --out "$work/all.png" \
    --methods guided,gradient,gradient-x-input,integrated-gradients,grad-cam,occlusion --cam-layer blocks.2 \
    --sanity | grep -A12 "sanity"
$PYTHON scripts/bench_attribution.py time --rounds 3 --device cuda | tail -8
step "bench_query cuda"
$PYTHON scripts/bench_query.py --device cuda --rounds 5 | tail -8
step "bench_dream cuda"
$PYTHON scripts/bench_dream.py --device cuda | tail -6
step "decoder gpu, precision bf16: build, neuron on cuda and on the cpu; torchrun (NCCL) with a crash and --resume"
fast=(--decoder gpu --precision bf16)
seconds $ACTINDEX build "$data" --out "$work/gpu-bf16.h5" "${common[@]}" "${fast[@]}" 2>&1 | tail -2
$ACTINDEX info "$work/gpu-bf16.h5" | grep decoder
$ACTINDEX neuron "$work/gpu-bf16.h5" --layer conv_head --unit 7 --device cuda --json | head -c 300; echo
$ACTINDEX neuron "$work/gpu-bf16.h5" --layer conv_head --unit 7 --device cpu --json | head -c 300; echo
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/gpu-bf16-run.h5" \
    "${common[@]}" "${fast[@]}" --crash-at 0:100:raise 2>&1 | grep -i "error\|resume" | head -3
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/gpu-bf16-run.h5" \
    "${common[@]}" "${fast[@]}" --resume 2>&1 | tail -1
same_index "$work/gpu-bf16.h5" "$work/gpu-bf16-run.h5" "gpu/bf16: torchrun, crashed and resumed == one process"

step "bench_decode fidelity on cuda (top-9 changes and score differences per decoder and precision)"
$PYTHON scripts/bench_decode.py fidelity --device cuda --images 1000 --batch-size 128
step "bench_decode end to end on cuda (targets: resnet50 bf16 build >= 0.9 of forward; resnet18 gpu >= 3x pil)"
$PYTHON scripts/bench_decode.py e2e --device cuda --images 4000 --batch-size 256 --workers 16 --rounds 2
step "patch search on cuda (the demo's cat eye, explained)"
seconds $ACTINDEX similar "$work/demo/index.h5" --image "$work/demo/chelsea.png" --box 85,135,145,210 --per-image 1 \
    --explain --device cuda --out "$work/cat-eye-cuda.png" | tail -4
step "bench_index cuda with resnet50 layer4's patch vectors (b0/a without them)"
$PYTHON scripts/bench_index.py --device cuda --model resnet50 --batch-size 256 --rounds 10 --jpegs 0 \
    --patch-layer layer4 --classes 0
step "dreams on cuda: actindex's Fourier and pixel dreams beside lucent's (when installed) at 200 steps"
$PYTHON scripts/bench_featurevis.py --device cuda --out "$work/featurevis-cuda.png" | tail -14
step "done"
