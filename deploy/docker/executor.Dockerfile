# syntax=docker/dockerfile:1
# An executor: one process per GPU, from deploy/lock/executor-cuda.txt (torch with its CUDA 13 libraries from PyPI,
# bitsandbytes, triton, nvidia-ml-py). Needs the NVIDIA container toolkit on the host and a driver for CUDA 13.
# Build from the repository root:
#   docker build -f deploy/docker/executor.Dockerfile -t lorafleet/executor:0.1.0 .
# Run: lorafleet executor --device cuda:0 (the container sees only the GPU it was given, as cuda:0; metrics 9465).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04

FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scheduler/ scheduler/
COPY executor/ executor/
COPY kernels/ kernels/
COPY gateway/ gateway/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${CUDA_IMAGE}
# Python 3.11 (the locks' interpreter) from Ubuntu 22.04; gcc and the Python headers because Triton compiles its
# launcher stubs with them at run time (lorafleet's kernels and bitsandbytes go through Triton).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/lorafleet PATH=/opt/lorafleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_STATE_DIR=/srv/lorafleet
RUN python3.11 -m venv /opt/lorafleet
COPY deploy/lock/executor-cuda.txt /tmp/executor-cuda.txt
RUN pip install --no-cache-dir -r /tmp/executor-cuda.txt && rm /tmp/executor-cuda.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY --chmod=755 deploy/docker/probe.py /usr/local/bin/lorafleet-probe
RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/lorafleet --create-home lorafleet \
    && install -d -o lorafleet -g lorafleet -m 0750 /srv/lorafleet
USER 10001:10001
WORKDIR /home/lorafleet
EXPOSE 9465
# /healthz turns 503 when the training loop did not come round for 15 min (loading a large base is slow); SIGTERM
# checkpoints every job and hands it back before the exit, so give the container minutes to stop (compose: 10 min).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["lorafleet-probe", "9465", "/healthz"]
STOPSIGNAL SIGTERM
CMD ["lorafleet", "executor", "--device", "cuda:0"]
