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
# The search kernels (mishards/core/_topk.c) are compiled here, checked on the installed package
# (-I: not the copy in /source), and the compiler leaves the image again.
# (Without a compiler `pip install` would still succeed, with the slower numpy paths.)
# Python's headers come with the official python images; a Debian base needs python3-dev.
RUN build_deps="gcc libc6-dev" \
    && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ] \
         || build_deps="$build_deps python3-dev"; } \
    && apt-get update && apt-get install -y --no-install-recommends $build_deps \
    && pip install --no-cache-dir --no-deps . && rm -rf build \
    && python -I -c "import mishards.core._topk" \
    && apt-get purge -y --auto-remove $build_deps && rm -rf /var/lib/apt/lists/*
USER mishards
EXPOSE 19530
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "scripts/docker_healthcheck.py", "SERVER_PORT", "SERVER_HOST"]
CMD ["mishards"]
