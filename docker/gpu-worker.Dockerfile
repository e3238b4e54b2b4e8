# syntax=docker/dockerfile:1
# The GPU trainer: a Celery worker on the `gpu` queue, on a CUDA PyTorch base so training tasks find the
# GPU. It runs the same Airflow, package and DAGs as docker/airflow.Dockerfile; its command is the
# `airflow-worker-gpu` service of pipeline/stack/services.py SERVICES. No configuration or secret is baked in.
# Needs the NVIDIA container toolkit on the host (compose: a device reservation; Kubernetes: nvidia.com/gpu).
#
#   docker build -f docker/gpu-worker.Dockerfile -t gru4rec-pipeline/gpu-worker:0.1.0 .
#
# The base image's torch must equal the torch pin of requirements.txt (pip then keeps the CUDA build).
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${TORCH_IMAGE}

ARG AIRFLOW_VERSION=3.3.2
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AIRFLOW_HOME=/opt/airflow \
    PIPELINE_HOME=/opt/airflow/pipeline-home \
    PIPELINE_DEVICE=cuda

# The same non-root user as the official Airflow image (uid 50000, group 0) so volumes are shared cleanly.
RUN useradd --uid 50000 --gid 0 --home-dir /home/airflow --create-home airflow \
 && mkdir -p /opt/airflow/dags /opt/airflow/logs /opt/airflow/secrets /opt/airflow/pipeline-home /opt/pipeline \
 && chown -R 50000:0 /opt/airflow /opt/pipeline

# The same requirements.txt as the Airflow image: this worker uploads its task logs to S3 too (Amazon provider).
COPY --chown=50000:0 requirements.txt /opt/pipeline/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/pipeline/requirements.txt

COPY --chown=50000:0 pyproject.toml README.md /opt/pipeline/
COPY --chown=50000:0 pipeline /opt/pipeline/pipeline
RUN pip install --no-cache-dir --no-deps /opt/pipeline
COPY --chown=50000:0 dags /opt/airflow/dags

USER 50000
WORKDIR /opt/airflow
CMD ["airflow", "celery", "worker", "--queues", "gpu", "--celery-hostname", "gpu@%h", "--skip-serve-logs"]
