# syntax=docker/dockerfile:1
# The Airflow image: every Airflow component (api-server, scheduler, dag-processor, triggerer) and the
# CPU Celery worker. Official apache/airflow base + the pipeline package and its pinned dependencies.
# What each container runs is `command:` in infra/compose/compose.yaml, the same argv as
# pipeline/stack/services.py SERVICES (tests/stack checks they agree). No configuration or secret is baked in:
# every setting arrives as an environment variable at run time.
#
#   docker build -f docker/airflow.Dockerfile -t gru4rec-pipeline/airflow:0.1.0 .
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIPELINE_HOME=/opt/airflow/pipeline-home

# The base image already runs as the non-root `airflow` user (uid 50000); pip installs into its home.
USER airflow
# torch from the CPU index: tasks on this image never see a GPU, and the CUDA wheels weigh gigabytes
# (the gpu-worker image carries CUDA). apache-airflow is pinned again so no requirement can move it.
# requirements.txt carries the providers the deployment settings use: Celery (executor), Amazon (S3 remote
# task logs, infra/k8s/airflow-values.yaml) and SMTP (alert e-mails); tests/stack/test_deploy_files.py checks it.
COPY --chown=airflow:0 requirements.txt /opt/pipeline/requirements.txt
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/pipeline/requirements.txt

COPY --chown=airflow:0 pyproject.toml README.md /opt/pipeline/
COPY --chown=airflow:0 pipeline /opt/pipeline/pipeline
RUN pip install --no-cache-dir --no-deps /opt/pipeline \
 && mkdir -p /opt/airflow/secrets "${PIPELINE_HOME}"
COPY --chown=airflow:0 dags /opt/airflow/dags

USER airflow
WORKDIR /opt/airflow
