#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA device (about 5 minutes on one GPU):
#
#     bash bench/gpu_check.sh
#
# 1. the Python to run with: this checkout's .venv if there is one; else, on a machine that
#    reaches no package index (the lent H200: its `python3` holds torch, timm and the rest of
#    the numeric stack), `python3` with the wheels of .whl/ installed (made here beforehand by
#    `bash bench/gpu_wheels.sh` and carried along) and this checkout on PYTHONPATH; else it sets
#    up .venv as `make setup` does,
# 2. runs the CUDA tests (tests/integration/test_cuda.py; skipped where there is no GPU),
# 3. runs bench/gpu_check.py: the DeiT-Ti/S/B SN-Net served with SNNET_DEVICE=cuda, every stitch
#    checked against the CPU in float32, then bench/load.py --quick on it (issue 14's elastic
#    range, item 3, on a many-core host),
# 4. runs bench/server_overhead.py on the bundled weights on the GPU (issue 14's item 1: the
#    serving path's cost against a bare FastAPI app, with the front ends auto picks there),
# and prints one summary; the figures also go to $OUT when it is set (the device tool's
# folder of files to bring back). Stops after 8 minutes whatever happens. Put its figures in
# bench/RESULTS.md ("GPU check"). GPU_CHECK_SETUP_ONLY=1: step 1 and an import check only.
#
# On the lent H200, from this machine (one call of the device tool's `run`):
#     bash bench/gpu_wheels.sh          # here, once: .whl/
#     run(command="PYTHONUNBUFFERED=1 bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    PY=python3
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
    # This checkout's packages from here, and `snnet` beside the interpreter, where the
    # benchmarks and tests look for the console script (no build: nothing to fetch).
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    bin=$($PY -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent)')
    # (the guard: the model process is spawned, and re-imports this script as __main__)
    printf '#!%s\nimport sys\nfrom server.cli import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
        "$($PY -c 'import sys; print(sys.executable)')" > "$bin/snnet"
    chmod +x "$bin/snnet"
else
    make setup
    PY=.venv/bin/python
fi
$PY -c 'import server.app, server.grpc_v2, snnet_core, mlxtend; print("gpu_check: serving stack imports with", __import__("sys").executable)'
if [ -n "${GPU_CHECK_SETUP_ONLY:-}" ]; then
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "gpu_check: no nvidia-smi; this check needs a CUDA machine" >&2; exit 2; }
$PY -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
deadline=$((SECONDS + 480))
timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/integration/test_cuda.py | tail -5
timeout $((deadline - SECONDS - 90)) $PY bench/gpu_check.py "$@" | tee bench/results/gpu_check.txt
timeout $((deadline - SECONDS)) $PY bench/server_overhead.py --requests 200 --rounds 4 \
    | tee bench/results/gpu_server_overhead.txt || echo "gpu_check: server_overhead did not finish"
if [ -n "${OUT:-}" ]; then
    cp bench/results/gpu_check.txt bench/results/gpu_server_overhead.txt "$OUT"/ || true
fi
echo "gpu_check: done in ${SECONDS}s"
