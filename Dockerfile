# syntax=docker/dockerfile:1
# The chainwatch image: `chainwatch collect|detect|run` as a non-root user (uid 10001).
#   docker build -t chainwatch:0.1.0 .
# The Helm chart (helm/chainwatch) runs it with a read-only root filesystem: everything
# written at run time goes to /tmp and the state dir, which the chart mounts as volumes.
ARG PYTHON_VERSION=3.11

# -- build: install the package and its dependencies into a venv -------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/chainwatch
COPY pyproject.toml README.md ./
COPY chainwatch ./chainwatch
COPY collector ./collector
COPY detector ./detector
COPY replay ./replay
# byte-compile now: the root filesystem is read-only at run time
RUN /opt/chainwatch/bin/pip install . \
 && /opt/chainwatch/bin/python -m compileall -q /opt/chainwatch

# -- run: the venv on a clean base, no build tools, no root ------------------------------
FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="chainwatch" \
      org.opencontainers.image.description="Anomaly monitoring for Ethereum/EVM nodes" \
      org.opencontainers.image.source="https://github.com/chainwatch/chainwatch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 chainwatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin chainwatch \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/chainwatch
COPY --from=build /opt/chainwatch /opt/chainwatch
# NUMBA_CACHE_DIR / MPLCONFIGDIR: numba (PyOD's and our forest walk, compiled on first use)
# and matplotlib write caches; keep them in /tmp
ENV PATH=/opt/chainwatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    CHAINWATCH_STATE_DIR=/var/lib/chainwatch \
    CHAINWATCH_METRICS_PORT=9108
VOLUME ["/var/lib/chainwatch"]
USER 10001:10001
EXPOSE 9108
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHAINWATCH_METRICS_PORT', '9108'), timeout=4)"]
ENTRYPOINT ["chainwatch"]
CMD ["run"]
