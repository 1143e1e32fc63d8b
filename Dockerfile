# syntax=docker/dockerfile:1
# The one generic stage image: which stage it serves is only configuration (STAGE_* environment variables,
# the pipeline directory mounted where STAGE_MANIFEST points).
#
#   docker build --build-arg VARIANT=cpu -t meshpipe/stage-service:0.1.0 .
#   docker build --build-arg VARIANT=gpu -t meshpipe/stage-service:0.1.0-gpu .
#
# Only the base dependencies of pyproject.toml are installed (FastAPI, uvicorn, onnxruntime, ...): never the
# `export` extra, so no TensorFlow, tf2onnx or onnx. The GPU variant swaps onnxruntime for the pinned
# onnxruntime-gpu of the `gpu` extra, with the CUDA and cuDNN libraries from their pip packages.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
COPY model_export/__init__.py model_export/manifest.py model_export/ort_session.py model_export/
COPY stage_service/ stage_service/
RUN pip install --upgrade pip && pip install .
# Versions live only in pyproject.toml: read the onnxruntime-gpu pin from its `gpu` extra.
RUN set -eu; \
    case "$VARIANT" in \
      cpu) ;; \
      gpu) req="$(python -c 'import tomllib; gpu = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]; pin = next(d for d in gpu if d.startswith("onnxruntime-gpu")); print(pin.replace("onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]", 1))')"; \
           pip uninstall -y onnxruntime; \
           pip install "$req";; \
      *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 1;; \
    esac
# Prove what the image holds: the service imports, and the export stack is absent.
RUN python -c "import importlib.util as u, sys; bad = [m for m in ('tensorflow', 'tf2onnx', 'onnx', 'keras') if u.find_spec(m)]; sys.exit(f'not allowed in the serving image: {bad}' if bad else 0)" \
 && python -c "import onnxruntime, stage_service.app; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="meshpipe stage-service" \
      org.opencontainers.image.description="One stage of a split ONNX pipeline over KServe v2 (variant: ${VARIANT})" \
      org.opencontainers.image.version="0.1.0"
# Not root, and not 1337 (Istio's sidecar UID, whose traffic the sidecar does not intercept).
RUN groupadd --system --gid 10001 stage \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stage
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STAGE_HOST=0.0.0.0 \
    STAGE_PORT=8080
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=30s \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('STAGE_PORT', '8080')}/v2/health/live\", timeout=2)"]
# Exec form: python is PID 1 and receives SIGTERM itself (drains in-flight requests, exits 0).
ENTRYPOINT ["python", "-m", "stage_service"]
