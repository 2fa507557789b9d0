# The proxy as a container: slim official Python, non-root, listening on 0.0.0.0:5000.
#   docker build -t twilio-transcribe .
#   docker run --rm -p 5000:5000 --env-file .env twilio-transcribe
# 0.0.0.0 is reachable from other machines, so the server refuses to start (exit 2) unless .env
# protects both routes: TWILIO_AUTH_TOKEN + PUBLIC_URL (or CALL_TOKEN) for /twilio, and
# CLIENT_TOKENS for /client. ALLOW_OPEN_SERVER=true overrides this; README "Security".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_URL=0.0.0.0:5000

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY *.py ./
COPY redishub/ ./redishub/

RUN useradd --create-home --uid 10001 proxy
USER proxy

EXPOSE 5000
# /healthz is plain HTTP on the same port (HTTPS when CERT_PEM/KEY_PEM are set).
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os, ssl, urllib.request; \
scheme = 'https' if os.environ.get('CERT_PEM') else 'http'; \
urllib.request.urlopen(f'{scheme}://127.0.0.1:5000/healthz', timeout=3, context=ssl._create_unverified_context())"
CMD ["python", "server.py"]
