#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA device (about 5 minutes on one GPU):
#
#     bash bench/gpu_check.sh
#
# 1. sets up .venv as `make setup` does (if missing),
# 2. runs the CUDA tests (tests/integration/test_cuda.py; skipped where there is no GPU),
# 3. runs bench/gpu_check.py: the DeiT-Ti/S/B SN-Net served with SNNET_DEVICE=cuda, every stitch
#    checked against the CPU in float32, then bench/load.py --quick on it (issue 14's elastic
#    range, item 3, on a many-core host),
# 4. runs bench/server_overhead.py on the bundled weights on the GPU (issue 14's item 1: the
#    serving path's cost against a bare FastAPI app, with the front ends auto picks there),
# and prints one summary. Stops after 8 minutes whatever happens. Put its figures in
# bench/RESULTS.md ("GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "gpu_check: no nvidia-smi; this check needs a CUDA machine" >&2; exit 2; }
[ -x .venv/bin/python ] || make setup
.venv/bin/python -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
deadline=$((SECONDS + 480))
timeout 150 .venv/bin/python -m pytest -q -rs tests/integration/test_cuda.py | tail -5
timeout $((deadline - SECONDS - 90)) .venv/bin/python bench/gpu_check.py "$@" | tee bench/results/gpu_check.txt
timeout $((deadline - SECONDS)) .venv/bin/python bench/server_overhead.py --requests 200 --rounds 4 \
    | tee bench/results/gpu_server_overhead.txt || echo "gpu_check: server_overhead did not finish"
echo "gpu_check: done in ${SECONDS}s"
