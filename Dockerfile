# syntax=docker/dockerfile:1
# snnet-serve image: CPU by default. For NVIDIA GPUs build with the CUDA wheels of PyTorch, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t snnet-serve:0.1.0-cuda .
# (those wheels carry their own CUDA runtime; the host needs the NVIDIA driver and container
# toolkit). BASE_IMAGE may be swapped too, as long as it has Python 3.11 at the same path in
# both stages, because the virtual environment is copied from one stage to the other.
# tests/deploy/test_dockerfile.py runs this file's pip, entry-point and health-check commands.
ARG BASE_IMAGE=python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# A current pip in the venv: the base image's resolves this dependency set in twice the time
# (pip 23.2 31 s of CPU, pip 26.3 12 s, tests/deploy/test_dockerfile.py's dry run here).
RUN python -m venv /opt/venv && python -m pip install --quiet --upgrade pip
WORKDIR /src
# Dependencies in their own layer, before the code, so that a code change does not reinstall
# torch. The list comes from pyproject.toml; constraints.txt pins torch, torchvision and timm.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt
RUN python -m pip install --extra-index-url ${TORCH_INDEX} -c constraints.txt -r requirements.txt
COPY README.md ./
COPY snnet_core snnet_core
COPY server server
RUN python -m pip install --no-deps .

FROM ${BASE_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home snnet \
    && mkdir -p /var/cache/snnet && chown snnet /var/cache/snnet
COPY --from=build /opt/venv /opt/venv
# The bundled model; mount another checkpoint directory and point SNNET_WEIGHTS at it to serve it.
COPY weights/manifest.json weights/model.safetensors /app/weights/
# The latency profile measured at start-up is kept on a volume, so a restarted container on the
# same hardware does not profile again.
ENV PATH=/opt/venv/bin:$PATH \
    SNNET_HOST=0.0.0.0 \
    SNNET_PORT=8000 \
    SNNET_WEIGHTS=/app/weights \
    SNNET_PROFILE_CACHE=/var/cache/snnet/profiles.json
VOLUME /var/cache/snnet
USER 10001
EXPOSE 8000 8081
# Liveness only: /healthz answers as soon as the server listens, while /readyz waits for the model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SNNET_PORT', '8000'), timeout=4)"
ENTRYPOINT ["snnet", "serve"]
