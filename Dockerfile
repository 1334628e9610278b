# glmtune in a container. One file for both images, so the CPU and GPU builds
# cannot drift apart; build arguments pick the variant (docker-compose.yml
# sets them for the `gpu` profile):
#   CPU (default): python slim base + the CPU torch wheel
#   GPU:           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
#                  --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX_URL=
# Python packages are installed by scripts/install.sh, the script `make setup`
# runs, so the image and a developer's .venv hold the same versions.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Without the CPU index, pip resolves torch on Linux to the CUDA build (GBs
# of GPU libraries that a CPU image never uses).
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The container user's ids: match the host user's so the bind-mounted data/
# and models/ stay writable on both sides (`make docker-build` passes id -u/-g).
ARG USER_ID=1000
ARG GROUP_ID=1000

ENV TORCH_SPEC=${TORCH_SPEC} \
    TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

# make runs the same targets as outside; tini as PID 1 passes `docker stop`'s
# SIGTERM to make, which passes it once to glmtune (it checkpoints and exits
# 143). The CUDA base has no Python; the python image must not get a second one.
RUN set -eux; \
    apt-get update; \
    packages="make tini"; \
    command -v python3 >/dev/null || packages="$packages python3 python3-venv"; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*

# Ubuntu images ship a user with uid 1000; it would take the id the host user needs.
RUN set -eux; \
    existing=$(getent passwd "$USER_ID" | cut -d: -f1 || true); \
    if [ -n "$existing" ]; then userdel -r "$existing" 2>/dev/null || true; fi; \
    getent group "$GROUP_ID" >/dev/null || groupadd -g "$GROUP_ID" glmtune; \
    useradd -m -u "$USER_ID" -g "$GROUP_ID" -s /bin/bash glmtune

WORKDIR /app

# Dependencies first, from only the files that pin them, so editing the code
# does not re-download torch on the next build. The project itself is not
# here yet; the install below puts it in place.
COPY pyproject.toml requirements.txt README.md ./
COPY scripts/install.sh scripts/
RUN python3 -m venv .venv \
    && scripts/install.sh .venv/bin/python \
    && rm -rf build *.egg-info

# The project, installed by `make setup` itself: the venv exists, pinned
# packages are already satisfied, so this only installs glmtune (editable, as
# for a developer) and writes the stamp that keeps `make train` from reinstalling.
# Bytecode is compiled now: the container user cannot write it into /app.
COPY . .
RUN make setup \
    && .venv/bin/python -m compileall -q glmtune \
    && mkdir -p data models "$HF_HOME" \
    && chown "$USER_ID:$GROUP_ID" data models "$HF_HOME"

USER glmtune
ENV PATH=/app/.venv/bin:$PATH
# Adapters, built models, data and downloads outlive the container.
VOLUME ["/app/data", "/app/models", "/cache/huggingface"]

ENTRYPOINT ["tini", "--"]
CMD ["make", "train"]
