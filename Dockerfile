# pgwarden: one image for the central controller (`pgwarden run`, the default) and the sidecar
# (`pgwarden sidecar`, set as the container's args). Multi-stage: the final stage has the venv only.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/pgwarden
COPY constraints.txt pyproject.toml README.md ./
COPY operator/ operator/
# Dependencies exactly as pinned in constraints.txt; then the project itself, not editable.
RUN /opt/pgwarden/bin/pip install --constraint constraints.txt . \
 && /opt/pgwarden/bin/pip uninstall --yes pip setuptools wheel

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pgwarden" \
      org.opencontainers.image.description="Enforces process policies on PostgreSQL from Kubernetes" \
      org.opencontainers.image.source="https://github.com/pgwarden/pgwarden" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/pgwarden/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/pgwarden /opt/pgwarden
USER 10001:10001
EXPOSE 9090 8080
ENTRYPOINT ["pgwarden", "run"]
