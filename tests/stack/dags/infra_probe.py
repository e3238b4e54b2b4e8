"""A small DAG that exercises the deployment's plumbing, not the pipeline (tests/stack/test_stack.py).

``stage`` runs on the default queue and writes an object to S3; ``train`` runs on the ``gpu`` queue in the
``gpu`` pool, does a few steps of real torch work, checkpoints after every step to S3 and logs to the MLflow
server; a retry resumes from the checkpoint and continues the same MLflow run. ``report`` runs on the
default queue again. Each task returns where it ran so the test can compare with task-instance metadata.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

BUCKET = "pipeline"


def _where() -> dict:
    import os

    from pipeline.stack.local import worker_hostname

    return {"hostname": worker_hostname(), "pid": os.getpid()}


@dag(
    dag_id="infra_probe",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    tags=["infra-test"],
    params={"steps": 3, "step_seconds": 0.5},
    doc_md=__doc__,
)
def infra_probe():
    @task(queue="default")
    def stage(**context) -> dict:
        import boto3

        key = f"probe/{context['run_id']}/input.txt"
        boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=b"staged by the default-queue worker")
        return {"key": key, **_where()}

    @task(queue="gpu", pool="gpu", retries=2, retry_delay=timedelta(seconds=2))
    def train(staged: dict, **context) -> dict:
        import json
        import time

        import boto3
        import mlflow
        import torch

        run_id, params, ti = context["run_id"], context["params"], context["ti"]
        s3 = boto3.client("s3")
        s3.head_object(Bucket=BUCKET, Key=staged["key"])  # the default worker's output is visible here
        ckpt_key = f"probe/{run_id}/checkpoint.json"
        try:
            ckpt = json.loads(s3.get_object(Bucket=BUCKET, Key=ckpt_key)["Body"].read())
        except s3.exceptions.NoSuchKey:
            ckpt = {"step": 0, "weight": 0.0}
        start = ckpt["step"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        weight = torch.tensor(ckpt["weight"], device=device, requires_grad=True)

        # One MLflow run per DAG run, found by tag, so a retry continues it instead of adding another.
        mlflow.set_experiment("infra-probe")
        found = mlflow.search_runs(filter_string=f"tags.airflow_run_id = '{run_id}'", output_format="list")
        with mlflow.start_run(run_id=found[0].info.run_id if found else None, tags={"airflow_run_id": run_id}) as run:
            mlflow.log_metric("resumed_from_step", start, step=ti.try_number)
            for step in range(start, int(params["steps"])):
                loss = (weight - 3.0) ** 2
                loss.backward()
                with torch.no_grad():
                    weight -= 0.1 * weight.grad
                    weight.grad.zero_()
                time.sleep(float(params["step_seconds"]))
                ckpt = {"step": step + 1, "weight": float(weight)}
                s3.put_object(Bucket=BUCKET, Key=ckpt_key, Body=json.dumps(ckpt).encode())
                mlflow.log_metric("loss", float(loss), step=step)
            mlflow.log_dict(ckpt, "final_checkpoint.json")
        return {"resumed_from": start, "try_number": ti.try_number, "mlflow_run_id": run.info.run_id,
                "device": device, "steps": ckpt["step"], **_where()}

    @task(queue="default")
    def report(result: dict) -> dict:
        return {"trained_on": result["hostname"], **_where()}

    report(train(stage()))


infra_probe()
