# syntax=docker/dockerfile:1
# chestct images. Two targets from one file:
#   serve (the default, last stage): gunicorn + the predictor + model/, nothing else.
#       docker build -t chestct:serve .
#       docker run --rm -p 8000:8000 chestct:serve
#   train: the whole pipeline (DVC, MLflow, TensorFlow); runs `dvc repro`.
#       docker build --target train -t chestct:train .
#       docker run --rm -v "$PWD":/app --user "$(id -u):$(id -g)" chestct:train
# The serve build copies model/: run the pipeline first (`make run`) so that a model is promoted.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CHESTCT_ROOT=/app
# A fixed, unprivileged uid: nothing in either image runs as root.
RUN groupadd --system --gid 10001 chestct \
    && useradd --system --uid 10001 --gid chestct --home-dir /app --shell /usr/sbin/nologin chestct
WORKDIR /app

# --------------------------------------------------------------------------- train
FROM base AS train
# git lets the stages record the commit they ran from; safe.directory accepts a repository
# mounted from the host with another owner.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*'
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps -e .
# dvc.lock: `dvc pull` needs it to fetch outputs from a remote (deploy/k8s/training/).
COPY dvc.yaml dvc.lock params.yaml app.py .dvcignore ./
COPY config ./config
COPY .dvc/config ./.dvc/config
# Without a mounted git checkout, DVC runs the image's own copy without git; a mounted
# repository brings its own .git and .dvc/ and is used as it is.
RUN printf '[core]\n    no_scm = true\n' > .dvc/config.local \
    && chown -R 10001:10001 /app
# Any uid may run the image (`--user $(id -u)` for a mounted repository): home is writable.
ENV HOME=/tmp
USER 10001:10001
CMD ["dvc", "repro"]

# --------------------------------------------------------------------------- serve
FROM base AS serve
# Exactly what serving needs (tests/e2e/test_delivery.py starts the app from a fresh virtual
# environment built from this file alone).
COPY requirements-serve.txt ./
RUN pip install --no-cache-dir -r requirements-serve.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps . && rm -rf src build
COPY config ./config
COPY params.yaml app.py ./
COPY --chown=10001:10001 model ./model
USER 10001:10001
ENV CHESTCT_BIND=0.0.0.0:8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "app:app"]
