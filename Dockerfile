# Mishards, the sharding proxy: `docker build -t mishards .` (make build).
# BASE_IMAGE is any Debian-like image with python3 >= 3.11 and its venv module; the smoke test
# (scripts/smoke_docker.sh) passes a locally built one because no image registry is reachable there.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# pip reads the system CA bundle, so a bundle copied into the base image (a TLS-intercepting
# proxy's) is honoured as well.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /source --shell /usr/sbin/nologin mishards \
    && mkdir -p /var/lib/milvus/db /tmp/mishards \
    && chown -R mishards:mishards /var/lib/milvus /tmp/mishards

WORKDIR /source
# Requirements first: the dependency layer is rebuilt only when they change (and is shared with
# Dockerfile.node, whose first steps are identical).
COPY requirements.txt ./
# annoy is published as source only: a compiler for the install, removed in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements.txt \
    && apt-get purge -y --auto-remove g++ && rm -rf /var/lib/apt/lists/*

# pymilvus 0.2.12 only for all_in_one/probe_test.py (`make probe_deploy`); the proxy never imports it.
RUN pip install --no-cache-dir --no-deps pymilvus==0.2.12 && pip install --no-cache-dir "requests>=2.22"

COPY . .
USER mishards
EXPOSE 19530
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "scripts/docker_healthcheck.py", "SERVER_PORT", "SERVER_HOST"]
CMD ["python", "mishards/main.py"]
