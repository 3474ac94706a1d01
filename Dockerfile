# outbox_relay: one image for `run` (the relay), `worker`, and the one-off commands.
# The base image is a build argument (compose passes OUTBOX_RELAY_PYTHON_IMAGE).
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# 1. Dependencies only, in a layer of their own: it is rebuilt when pyproject.toml
#    changes, not when the source does.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
# 2. The project itself, without touching the dependencies.
COPY README.md ./
COPY outbox_relay ./outbox_relay
RUN pip install --no-deps . && rm -rf /src

WORKDIR /
USER nobody
# /healthz on OUTBOX_RELAY_HTTP_PORT (no curl in slim images: python's urllib). Without the
# port set (one-off commands) there is nothing to probe and the check passes.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('OUTBOX_RELAY_HTTP_PORT'); sys.exit(0) if not port else urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
