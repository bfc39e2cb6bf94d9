# pgwarden: one image for the central controller (`pgwarden run`, the default) and the sidecar
# (`pgwarden sidecar`: set the container's `command: [pgwarden, sidecar]`).
#
# Two stages: `build` turns the source into a wheel and installs it, with exactly the dependency versions
# pinned in constraints.txt, into a venv at /opt/pgwarden; the final stage is the same slim base with
# that venv copied in and nothing else: no pip in the venv, no wheel files, no caches, no compilers
# (every dependency must come as a binary wheel, so none is ever needed).
#
# These machines cannot build images; tests/unit/test_packaging.py checks what can be checked without
# Docker: the same wheel built from the same files (.dockerignore), installed the same way into a fresh
# venv, runs this ENTRYPOINT; and every dependency resolves to a binary wheel for this base's Python.
# Lint: `make lint` runs hadolint (no rule is ignored).

# Base: the official slim Python, pinned by version, the same in both stages (the venv's interpreter is
# the base's python3). The BASE build argument exists for machines that cannot pull it: `make image`
# passes a Debian bookworm image with Debian's Python made there by debootstrap (hack/image-build.sh).
# tests/unit/test_packaging.py checks the default (hadolint cannot see through the argument).
# For byte-for-byte rebuilds pin the digest too (`...-slim-bookworm@sha256:...`, from
# `docker buildx imagetools inspect`) and let a bot such as Renovate bump it.
ARG BASE=python:3.12.14-slim-bookworm
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the build context).
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
COPY constraints.txt ./
# The venv gets no pip of its own (--without-pip): the stage's pip installs into it from outside.
# --only-binary: a dependency without a wheel for this Python fails the build instead of compiling.
# Bytecode is compiled here on purpose: the container's root filesystem is read-only at run time.
RUN python -m venv --without-pip /opt/pgwarden \
 && python -m pip --python /opt/pgwarden/bin/python install \
      --constraint constraints.txt --only-binary=:all: /wheels/pgwarden-*.whl

FROM ${BASE}
# The version must equal the package's (pyproject.toml) and the image tag in manifests/; a test checks.
LABEL org.opencontainers.image.title="pgwarden" \
      org.opencontainers.image.description="Enforces process policies on PostgreSQL from Kubernetes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/pgwarden/pgwarden" \
      org.opencontainers.image.licenses="Apache-2.0"
# HOME=/tmp: the numeric user has no passwd entry and /tmp is the one writable mount (an emptyDir)
# under readOnlyRootFilesystem, so anything that wants a home directory gets a usable one.
# MALLOC_ARENA_MAX=2: glibc's malloc gives each thread that allocates (kopf's executor, the metrics server,
# the kubernetes client's pool) its own arena; two keep 8 MB of RSS less at 20 policies x 200 pods
# (bench/operator_memory.py), at no measurable cost: one event loop does nearly all the allocating.
# MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 128 KiB: glibc otherwise raises its mmap threshold each
# time a large block (a policy's status, a watch event's body) is freed, so later large blocks land in the
# heap and their freed space is never returned; fixed, 4,000 targets hold 4-7 MB less (137-140 against
# 144-145 MB, bench/operator_memory.py, interleaved runs).
ENV PATH=/opt/pgwarden/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072 \
    MALLOC_TRIM_THRESHOLD_=131072
COPY --from=build /opt/pgwarden /opt/pgwarden
# Numeric, so Kubernetes' runAsNonRoot can verify it; matches runAsUser/runAsGroup in manifests/.
USER 10001:10001
# 9090: Prometheus /metrics; 8080: /healthz for the liveness and readiness probes.
EXPOSE 9090 8080
ENTRYPOINT ["pgwarden", "run"]
