# The one generic stage image: which stage it serves is only configuration (STAGE_* environment variables,
# the pipeline directory mounted where STAGE_MANIFEST points).
#
#   make image                 # CPU variant: meshpipe/stage-service:0.1.0 (scripts/stage-image.sh)
#   make image VARIANT=gpu     # meshpipe/stage-service:0.1.0-gpu
#   docker build --build-arg VARIANT=cpu -t meshpipe/stage-service:0.1.0 .    # where python:3.11-slim-bookworm pulls
#
# It builds with the legacy builder as well as BuildKit (no `# syntax=` line: that makes BuildKit fetch a
# frontend image from a registry). What goes in is only what .dockerignore admits, the one list of it:
# the Dockerfile copies the context whole, and tests/image/test_context.py proves, with Docker's own
# ignore matching, that the context holds every COPY source and is enough to serve.
#
# Only the base dependencies of pyproject.toml are installed (FastAPI, uvicorn, onnxruntime, ...): never the
# `export` extra, so no TensorFlow, tf2onnx or onnx.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Versions live only in pyproject.toml: its base dependencies, and in the GPU variant the `gpu` extra's
# onnxruntime-gpu (with the CUDA and cuDNN libraries from their pip packages) in place of onnxruntime.
# A stage of its own, so that the install below stays cached while the requirements are the same, whatever
# else changes in pyproject.toml.
FROM ${PYTHON_IMAGE} AS requirements
ARG VARIANT=cpu
COPY pyproject.toml /
RUN python -c "\
import sys, tomllib; \
variant = sys.argv[1]; \
project = tomllib.load(open('/pyproject.toml', 'rb'))['project']; \
gpu = [d.replace('onnxruntime-gpu', 'onnxruntime-gpu[cuda,cudnn]', 1) for d in project['optional-dependencies']['gpu']]; \
cpu = project['dependencies']; \
variants = {'cpu': cpu, 'gpu': [d for d in cpu if not d.startswith('onnxruntime=')] + gpu}; \
variant in variants or sys.exit(f'VARIANT must be cpu or gpu, got {variant!r}'); \
open('/requirements.txt', 'w').write(''.join(d + chr(10) for d in variants[variant]))" "$VARIANT"

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first: this layer stays cached until the requirements change, so a change of the serving
# code rebuilds only the last steps.
COPY --from=requirements /requirements.txt /
RUN pip install --upgrade pip && pip install -r /requirements.txt
# The serving code: the context as .dockerignore filters it.
COPY . ./
RUN pip install --no-deps .
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
