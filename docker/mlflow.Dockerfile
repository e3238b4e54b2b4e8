# syntax=docker/dockerfile:1
# The MLflow tracking server (runs, registry, proxied artifacts in S3). Its command is the `mlflow`
# service of pipeline/stack/services.py SERVICES: `mlflow server`, configured only by environment variables
# (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST, MLFLOW_PORT, ...).
# Pins are those of requirements.txt (tests/stack checks they agree). No configuration or secret baked in.
#
#   docker build -f docker/mlflow.Dockerfile -t gru4rec-pipeline/mlflow:0.1.0 .
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
 && useradd --uid 10001 --create-home mlflow

USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --retries=5 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['MLFLOW_PORT'], timeout=4)"]
CMD ["mlflow", "server"]
