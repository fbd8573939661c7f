# ttsstream: WebSocket streaming speech server, with the offline voice.
#
#   docker build -t ttsstream .
#   docker run -p 8765:8765 -v ttsstream-cache:/var/cache/ttsstream ttsstream
#
# Build stage: a virtual environment with ttsstream and its local extra (eSpeak NG
# and LAME come as wheels, so no compiler is needed); only the venv is copied on.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ttsstream ./ttsstream
COPY clients ./clients
RUN python -m venv /opt/ttsstream \
    && /opt/ttsstream/bin/pip install ".[local]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/ttsstream ttsstream \
    && mkdir -p /var/cache/ttsstream \
    && chown ttsstream:ttsstream /var/cache/ttsstream
COPY --from=build /opt/ttsstream /opt/ttsstream
# The side port listens on every interface of the container so that probes from
# outside it (an orchestrator's, your monitoring's) reach /health and /ready; the
# image publishes nothing, so it stays private unless you publish it.
ENV PATH=/opt/ttsstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8765 \
    HEALTH_PORT=8766 \
    HEALTH_HOST=0.0.0.0 \
    CACHE_DIR=/var/cache/ttsstream
VOLUME ["/var/cache/ttsstream"]
USER 10001:10001
WORKDIR /var/lib/ttsstream
EXPOSE 8765 8766
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEALTH_PORT', '8766') + '/health', timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains
# it (give it --time longer than DRAIN_TIMEOUT).
STOPSIGNAL SIGTERM
ENTRYPOINT ["ttsstream"]
CMD ["serve"]
