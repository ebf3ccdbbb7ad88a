#!/usr/bin/env bash
# The CUDA paths, run on a machine with one GPU, in one pass:
#   - the GPU-marked tests (a CUDA build equals the CPU build; exact sums on CUDA; pinned batches);
#   - `actindex demo --device cuda`: build, neuron sheets, filters, dream, similarity and the atlas on the GPU;
#   - crash and resume on CUDA under torchrun, compared dataset for dataset with an uninterrupted CUDA build;
#   - torchrun with more processes than GPUs: the one-line refusal;
#   - the atlas of every unit of the demo index on the GPU with 8 worker processes, against a few units on the
#     CPU in the same run (seconds per unit);
#   - scripts/bench_query.py and scripts/bench_dream.py with --device cuda.
# Usage, from the repository root with actindex installed (ACTINDEX names the command, PYTHON the interpreter):
#   bash scripts/gpu_check.sh WORKDIR
set -uo pipefail
work=${1:?usage: gpu_check.sh WORKDIR}
PYTHON=${PYTHON:-python3}
ACTINDEX=${ACTINDEX:-actindex}
mkdir -p "$work"
step() { echo; echo "=== $* ($(date +%T))"; }
seconds() { local t0=$SECONDS; "$@"; local rc=$?; echo "[${*:1:2}…: $((SECONDS - t0)) s, exit $rc]"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "GPU tests"
$PYTHON -m pytest -q -m gpu -p no:cacheprovider tests/test_build.py tests/test_images.py tests/test_exact_sum.py

step "demo on cuda"
seconds $ACTINDEX demo --device cuda --out "$work/demo" | grep -v "^  unit\|^$" | tail -25

step "crash and resume on cuda under torchrun (1 process) vs an uninterrupted cuda build"
data="$work/demo/images"
common=(--model timm:efficientnet_lite0 --weights "$work/demo/efficientnet_lite0.safetensors" --batch-size 16
        --layers blocks.2,blocks.4,conv_head --k 6 --device cuda --checkpoint-every 64 --faiss-factory none)
$ACTINDEX build "$data" --out "$work/plain.h5" "${common[@]}" 2>&1 | tail -1
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/resumed.h5" \
    "${common[@]}" --crash-at 0:100:raise 2>&1 | grep -i "error\|resume" | head -3
torchrun --standalone --nproc_per_node=1 "$(command -v "$ACTINDEX")" build "$data" --out "$work/resumed.h5" \
    "${common[@]}" --resume 2>&1 | tail -2
$PYTHON - "$work/plain.h5" "$work/resumed.h5" <<'EOF'
import sys, h5py, numpy as np
def datasets(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out
a, b = datasets(sys.argv[1]), datasets(sys.argv[2])
bad = [k for k in a if k not in b or not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")]
print("resumed == uninterrupted, every dataset bit for bit:", a.keys() == b.keys() and not bad, bad[:5])
EOF

step "two processes on one GPU"
torchrun --standalone --nproc_per_node=2 "$(command -v "$ACTINDEX")" build "$data" --out "$work/two.h5" \
    "${common[@]}" 2>&1 | grep -i "error" | head -2

step "atlas: every unit on cuda (8 jobs) vs 4 units per layer on the cpu"
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cpu" --units 0-3 --device cpu | tail -1
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cuda" --device cuda --jobs 8 --batch-size 64 \
    | tail -2
seconds $ACTINDEX atlas "$work/demo/index.h5" --out "$work/atlas-cuda1" --device cuda --jobs 1 --batch-size 64 \
    | tail -2

step "bench_query cuda"
$PYTHON scripts/bench_query.py --device cuda --rounds 5 | tail -8
step "bench_dream cuda"
$PYTHON scripts/bench_dream.py --device cuda | tail -6
step "done"
