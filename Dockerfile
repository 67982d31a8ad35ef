# pneumoscan serving image: slim, non-root, shipped model baked in, offline-buildable.
#   docker build -t pneumoscan .                       (wheels from the package index)
#   python3.11 -m pip wheel -w wheelhouse -c constraints.txt . 'setuptools>=69' wheel && docker build -t pneumoscan .
#   (offline: the wheelhouse holds the build backend too)
# It serves on LiteRT without TensorFlow. The training image adds it (1.3 GB):
#   docker build --build-arg EXTRAS=training -t pneumoscan-train .
#   (offline: python3.11 -m pip wheel -w wheelhouse -c constraints.txt '.[training]' 'setuptools>=69' wheel first)
# Either way the versions are constraints.txt's, the ones CI tested (a wheelhouse kept from an
# earlier build may hold newer wheels too: the constraints choose).
# BASE_IMAGE must be Debian bookworm-like; one without Python gets Debian's python3 (3.11).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv && \
        rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
COPY training ./training
RUN python3 -m venv /opt/venv && \
    target="." && \
    if [ -n "$EXTRAS" ]; then target=".[$EXTRAS]"; fi && \
    set -- /wheelhouse/*.whl && \
    if [ -e "$1" ]; then \
        /opt/venv/bin/pip install --no-index --find-links /wheelhouse -c constraints.txt "$target" ; \
    else \
        /opt/venv/bin/pip install -c constraints.txt "$target" ; \
    fi && \
    find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PNEUMOSCAN_MODEL_STORE=/models \
    PNEUMOSCAN_DATA_DIR=/data \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/sh", "-eu", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pneumoscan && \
    mkdir -p /data && chown pneumoscan /data
COPY --from=build /opt/venv /opt/venv
COPY --chown=10001:10001 model_store /models
USER 10001
WORKDIR /tmp
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "app.healthcheck", "8000"]
# One process: the model, the micro-batcher and the SQLite writer share it; the model instances
# use the cores. Scale out with more containers, not more workers.
CMD ["pneumoscan", "serve", "--host", "0.0.0.0", "--port", "8000"]
