# Mishards, the sharding proxy: `make build` (docker build -t mishards -f Dockerfile .).
# BASE_IMAGE is any Debian-like image with python3 >= 3.11 and its venv module (make BASE_IMAGE=...);
# the smoke test (scripts/smoke_docker.sh) passes a locally built one.
# Only the proxy's dependency set (requirements-base.txt + requirements-proxy.txt): no faiss.
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
# Requirements first: the dependency layer is rebuilt only when they change.
COPY requirements-base.txt requirements-proxy.txt ./
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements-base.txt -r requirements-proxy.txt

# pymilvus 0.2.12 only for all_in_one/probe_test.py (`make probe_deploy`); the proxy never imports it.
RUN pip install --no-cache-dir --no-deps pymilvus==0.2.12 && pip install --no-cache-dir "requests>=2.22" "ujson>=5"

COPY . .
# The merge kernel (mishards/core/_topk.c) is compiled here; the compiler leaves the image again.
# Without it the install would still succeed, with the slower numpy merge.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir --no-deps . && rm -rf build \
    && python -c "from mishards.core import merge; assert merge.COMPILED_KERNEL" \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
USER mishards
EXPOSE 19530
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "scripts/docker_healthcheck.py", "SERVER_PORT", "SERVER_HOST"]
CMD ["mishards"]
