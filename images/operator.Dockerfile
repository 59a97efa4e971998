# syntax=docker/dockerfile:1.7
# The Crucible operator: Kopf and the resource models, no torch.
#   docker build -f images/operator.Dockerfile -t crucible-operator .
# Build context is the repository root; .dockerignore keeps it to the sources.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trainer ./trainer
# A wheel install (not editable) into its own prefix, copied whole into the runtime stage.
RUN python -m venv /opt/crucible \
 && /opt/crucible/bin/pip install ".[operator]" \
 && /opt/crucible/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="crucible-operator" \
      org.opencontainers.image.description="Kopf operator reconciling Crucible training resources" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 65532 crucible \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin crucible
COPY --from=build /opt/crucible /opt/crucible
ENV PATH=/opt/crucible/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 8080: Kopf liveness (/healthz); 9090: Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["crucible"]
CMD ["operator"]
