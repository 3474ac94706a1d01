# outbox_relay: one image for `run` (the relay), `worker`, and the one-off commands.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox_relay ./outbox_relay
RUN pip install . && rm -rf /src

WORKDIR /
USER nobody
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
