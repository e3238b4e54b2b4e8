"""The process-level deployment (pipeline.stack.local): real Airflow components with CeleryExecutor, two
Celery workers (default queue / gpu queue), PostgreSQL, Redis, SeaweedFS S3 and an MLflow server.

DAGs are triggered through the REST API /api/v2; where each task ran is read from task-instance metadata
(queue, pool, hostname of every try) and cross-checked with what the tasks report. The stack is brought
up once for the module and torn down in a ``finally``, also when a test fails.

Two DAGs run on it:
- ``infra_probe`` (tests/stack/dags): the plumbing alone (queues, pool, S3, MLflow server, crash + retry),
  independent of the pipeline's code, so a failure here points at the deployment;
- ``gru4rec_daily`` (dags/): the real pipeline on generated click logs in S3: a first date promotes a
  champion; a second date is triggered before its partition exists (the sensor waits, giving its worker
  slot back between looks, until the partition lands), then the gpu worker is killed in the middle of its
  training and a fresh worker finishes the run from the checkpoint without duplicating anything.

Last, ``python -m pipeline backfill`` retrains two past dates through Airflow's backfill (newest first, one at a
time): the newer one, whose test window the champion trained on, is refused by the leakage guard, the older one,
which the champion never saw, is compared with it; the same backfill again creates no run, and a forced one
(``--rerun``) re-runs every task without registering, comparing, promoting or logging anything twice;
``python -m pipeline status`` then shows the backfill's runs (REST API and metadata DB agree).

``stack.sh up`` and ``stack.sh down`` run as separate processes, as people run them; after ``down`` no
process of the stack may remain.

About 7 to 9 minutes on 2 cores (421 s measured): stack start ~20-40 s, probe runs ~15 s + ~55 s, real runs
~50-65 s + ~75-90 s (each crash waits ~30 s for the scheduler's heartbeat timeout to notice the dead worker),
deadline ~25 s, backfill ~170 s (two runs one at a time, then the forced re-run of both at once), teardown ~10 s.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.config import TrackingConfig
from pipeline.flow.airflow_api import AirflowAPI, AirflowAPIError, quote
from pipeline.stack import databases as stack_db
from pipeline.stack import local as stack_cli
from pipeline.stack import processes
from pipeline.stack import services as stack_services
from pipeline.stack import state as stack_state
from pipeline.stack import supervisor as stack_supervisor

pytestmark = [pytest.mark.stack, pytest.mark.integration, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
STACK_SH = HERE.parents[1] / "infra" / "local" / "stack.sh"
PROBE = "infra_probe"
DAG = "gru4rec_daily"
CLICKS = f"s3://{stack_services.BUCKET}/clicks"
OUTPUT = f"s3://{stack_services.BUCKET}/output"
FIRST_DAY, RUN1_DAY, RUN2_DAY = "2026-03-01", "2026-03-03", "2026-03-04"

# The pipeline's deployment settings for this test: manual runs only (no scheduled run competing with
# the triggered ones under max_active_runs=1), quick retries, a small network and a 2-trial grid.
PIPELINE_CONFIG = {
    "airflow": {
        "schedule": None,
        "train_days": 3,
        "retries": 2,
        "retry_delay_minutes": 0.05,
        "max_retry_delay_minutes": 0.1,
        "grid": {"learning_rate": [0.1, 0.2]},
        "partition_poke_minutes": 2 / 60,  # the late partition is noticed within seconds
    },
    "gru4rec": {"layers": [64], "n_epochs": 2, "n_sample": 256, "batch_size": 32},
    "build": {"min_item_support": 3},
    "tracking": {"bootstrap_samples": 500, "system_metrics": False},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_state.StackState]:
    home = tmp_path_factory.mktemp("stack")
    config = home / "pipeline-config.yaml"
    config.write_text(yaml.safe_dump(PIPELINE_CONFIG))
    up = [str(STACK_SH), "--home", str(home), "up", "--bundle", f"infra-tests={HERE / 'dags'}", "--env", f"PIPELINE_CONFIG={config}"]
    started = subprocess.run(up, capture_output=True, text=True, timeout=420)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield stack_state.StackState.load(home)
    finally:
        stopped = subprocess.run([str(STACK_SH), "--home", str(home), "down"], capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        # Nothing of the stack survives `down`, although `down` is the parent of none of it.
        assert _stack_processes(home) == []


def _stack_processes(home: Path) -> list[str]:
    """Every running process started for the stack in ``home`` (they all get its folder in their environment)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name", "environ"]):
        env = proc.info["environ"] or {}
        if any(str(home) in value for value in env.values()) and processes.alive(proc.info["pid"]):
            found.append(f"{proc.info['pid']} {proc.info['name']}")
    return found


@pytest.fixture(scope="module")
def s3(stack: stack_state.StackState):
    import boto3

    env = stack.client_env()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


@pytest.fixture(scope="module")
def mlflow_client(stack: stack_state.StackState):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)


def _generate(stack: stack_state.StackState, start: str, days: int) -> None:
    from pipeline.data.generate import generate_clicks

    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.client_env().items():
            mp.setenv(key, value)
        generate_clicks(CLICKS, days=days, start_date=start, sessions_per_day=800, n_items=300, seed=3)


@pytest.fixture(scope="module")
def clicks(stack: stack_state.StackState) -> str:
    """Three days of generated click logs in the stack's bucket (dt=YYYY-MM-DD partitions); the fourth
    (RUN2_DAY) arrives late, while its run waits for it."""
    _generate(stack, FIRST_DAY, 3)
    return CLICKS


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack_services.BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _xcom(api: AirflowAPI, dag_id: str, run_id: str, task_id: str) -> dict:
    entry = api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/xcomEntries/return_value")
    value = entry["value"]
    return json.loads(value) if isinstance(value, str) else value


def _running_under_gpu_worker(stack: stack_state.StackState, ti: dict) -> bool:
    import psutil

    worker = psutil.Process(stack.pids["airflow-worker-gpu"])
    return ti["state"] == "running" and ti["pid"] in {p.pid for p in worker.children(recursive=True)}


def _crash_gpu_worker(stack: stack_state.StackState) -> None:
    """SIGKILL the gpu worker and its whole process tree (the task too), then start a fresh worker."""
    stack_supervisor.stop_service(stack, "airflow-worker-gpu", crash=True)
    stack_supervisor.start_service(stack, "airflow-worker-gpu")


# ---------------------------------------------------------------------------------------------
# The stack itself


def test_stack_is_up_and_bound_to_localhost(stack: stack_state.StackState) -> None:
    import psutil

    table = stack_cli.status(stack.home)
    assert {name for name, entry in table.items() if not entry["alive"]} == set()
    assert {table[n]["health"] for n in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")} == {"healthy"}
    # Every listening socket of every stack process is on 127.0.0.1.
    listening = []
    for pid in [*stack.pids.values(), stack.s3_pid]:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                listening += [(proc.pid, c.laddr) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                continue
    assert listening, "no listening sockets found: the check would pass vacuously"
    assert [(pid, addr) for pid, addr in listening if addr.ip != "127.0.0.1"] == []
    assert stack.api().get("/pools/gpu")["slots"] == 1


def test_status_cli_reports_every_service(stack: stack_state.StackState, capsys: pytest.CaptureFixture[str]) -> None:
    assert stack_cli.main(["--home", stack.home, "status"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["seaweedfs", *stack_services.SERVICE_NAMES]


# ---------------------------------------------------------------------------------------------
# The plumbing, with the probe DAG


def test_probe_tasks_run_on_their_queues_workers(stack: stack_state.StackState, s3, mlflow_client) -> None:
    api = stack.api()
    api.wait_for_dag(PROBE)
    run_id = api.trigger(PROBE, "2026-01-01T00:00:00+00:00", {"steps": 3})["dag_run_id"]
    api.wait_for_run(PROBE, run_id, timeout=180)

    tis = {ti["task_id"]: ti for ti in api.task_instances(PROBE, run_id)}
    assert {t: (ti["queue"], ti["pool"], ti["hostname"]) for t, ti in tis.items()} == {
        "stage": ("default", "default_pool", "airflow-worker"),
        "train": ("gpu", "gpu", "airflow-worker-gpu"),
        "report": ("default", "default_pool", "airflow-worker"),
    }
    # What the tasks saw of themselves agrees with the metadata.
    trained = _xcom(api, PROBE, run_id, "train")
    assert trained["hostname"] == "airflow-worker-gpu" and trained["try_number"] == 1 and trained["resumed_from"] == 0
    assert _xcom(api, PROBE, run_id, "stage")["hostname"] == "airflow-worker"
    # Both workers' objects are in the bucket; the MLflow server has the run and its artifact (stored in S3).
    assert set(_keys(s3, f"probe/{run_id}/")) == {f"probe/{run_id}/input.txt", f"probe/{run_id}/checkpoint.json"}
    assert [m.step for m in mlflow_client.get_metric_history(trained["mlflow_run_id"], "loss")] == [0, 1, 2]
    assert any(k.endswith(f"{trained['mlflow_run_id']}/artifacts/final_checkpoint.json") for k in _keys(s3, "mlflow/"))


def test_probe_killed_gpu_worker_retry_resumes_from_checkpoint(stack: stack_state.StackState, s3, mlflow_client) -> None:
    api = stack.api()
    steps = 12
    run_id = api.trigger(PROBE, "2026-01-02T00:00:00+00:00", {"steps": steps, "step_seconds": 1.0})["dag_run_id"]
    ckpt_key = f"probe/{run_id}/checkpoint.json"
    deadline = time.monotonic() + 120
    step = 0
    while step < 3:  # training well under way: a few checkpoints written
        assert time.monotonic() < deadline, "training never reached step 3"
        try:
            step = json.loads(s3.get_object(Bucket=stack_services.BUCKET, Key=ckpt_key)["Body"].read())["step"]
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.5)
    train = next(ti for ti in api.task_instances(PROBE, run_id) if ti["task_id"] == "train")
    assert _running_under_gpu_worker(stack, train)

    _crash_gpu_worker(stack)
    api.wait_for_run(PROBE, run_id, timeout=240)

    assert [(t["try_number"], t["state"], t["hostname"]) for t in api.tries(PROBE, run_id, "train")] == [
        (1, "failed", "airflow-worker-gpu"),
        (2, "success", "airflow-worker-gpu"),
    ]
    result = _xcom(api, PROBE, run_id, "train")
    assert result["try_number"] == 2 and result["resumed_from"] >= 3 and result["steps"] == steps
    # One MLflow run for the DAG run, continued by the retry; no step logged twice (each step's checkpoint
    # is written before its metric, so only an unlogged step is redone).
    runs = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("infra-probe").experiment_id], f"tags.airflow_run_id = '{run_id}'"
    )
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    logged = [m.step for m in mlflow_client.get_metric_history(result["mlflow_run_id"], "loss")]
    assert len(logged) == len(set(logged)) and set(range(result["resumed_from"], steps)) <= set(logged)
    resumes = {m.step: m.value for m in mlflow_client.get_metric_history(result["mlflow_run_id"], "resumed_from_step")}
    assert resumes == {1: 0, 2: result["resumed_from"]}


# ---------------------------------------------------------------------------------------------
# The real pipeline


def test_daily_dag_trains_on_the_gpu_worker_and_promotes(stack: stack_state.StackState, clicks: str, s3, mlflow_client) -> None:
    api = stack.api()
    api.wait_for_dag(DAG, timeout=120)
    run_id = api.trigger(DAG, f"{RUN1_DAY}T00:00:00+00:00", {})["dag_run_id"]
    run = api.wait_for_run(DAG, run_id, timeout=360)

    # Routing, from task-instance metadata: training on the gpu-queue worker, everything else on the default one.
    tis = api.task_instances(DAG, run_id)
    trains = [ti for ti in tis if ti["task_id"] == "train"]
    assert len(trains) == 2
    assert {(ti["queue"], ti["pool"], ti["hostname"]) for ti in trains} == {("gpu", "gpu", "airflow-worker-gpu")}
    assert {(ti["queue"], ti["hostname"]) for ti in tis if ti["task_id"] != "train"} == {("default", "airflow-worker")}

    # Datasets, validated partitions and the run summary are in the bucket.
    outputs = _keys(s3, "output/")
    dataset = f"output/datasets/dt={RUN1_DAY}/"
    manifest = json.loads(s3.get_object(Bucket=stack_services.BUCKET, Key=f"{dataset}manifest.json")["Body"].read())
    listed = {f"{dataset}manifest.json"} | {f"{dataset}{f['path']}" for f in manifest["files"].values()}
    assert listed == {k for k in outputs if k.startswith(dataset)}  # exactly the files the manifest lists
    assert {f"output/validated/dt={d}/report.json" for d in ("2026-03-01", "2026-03-02", RUN1_DAY)} <= set(outputs)
    summary = json.loads(s3.get_object(Bucket=stack_services.BUCKET, Key=f"output/runs/dt={RUN1_DAY}/summary.json")["Body"].read())

    # The MLflow server has the parent run and both trial runs, finished and nested; their artifacts are in S3.
    parent = mlflow_client.get_run(summary["parent_run_id"])
    assert parent.data.tags["pipeline.date"] == RUN1_DAY
    trial_runs = [mlflow_client.get_run(t["run_id"]) for t in summary["trials"]]
    assert len({r.info.run_id for r in trial_runs}) == 2
    assert {(r.info.status, r.data.tags["mlflow.parentRunId"]) for r in trial_runs} == {("FINISHED", parent.info.run_id)}
    artifact_keys = _keys(s3, "mlflow/")
    for r in trial_runs:
        assert r.info.artifact_uri.startswith("mlflow-artifacts:"), r.info.artifact_uri  # proxied by the server
        assert any(f"/{r.info.run_id}/artifacts/" in k for k in artifact_keys), f"no artifacts of {r.info.run_id} in S3"

    # The registry's champion alias points at the version registered from this run's best trial.
    decision = summary["decision"]
    assert decision["action"] == "promoted", decision["reason"]
    champion = mlflow_client.get_model_version_by_alias(decision["model_name"], "champion")
    assert champion.version == str(decision["candidate_version"])
    assert champion.run_id == decision["candidate_run_id"] in {r.info.run_id for r in trial_runs}
    # The summary task set the DAG run note through the REST API connection the stack provides.
    assert (api.get(f"/dags/{DAG}/dagRuns/{quote(run_id)}")["note"] or "").startswith("**promoted**")
    assert run["state"] == "success"


def test_daily_dag_waits_for_a_late_partition_and_survives_a_gpu_worker_crash_mid_training(
    stack: stack_state.StackState, clicks: str, s3, mlflow_client
) -> None:
    api = stack.api()
    api.wait_for_dag(DAG, timeout=120)
    epochs = 8
    conf = {"grid": {"learning_rate": [0.1]}, "gru4rec": {"n_epochs": epochs}}
    run_id = api.trigger(DAG, f"{RUN2_DAY}T00:00:00+00:00", conf)["dag_run_id"]
    this_date = f"tags.`pipeline.kind` = 'training' and tags.`pipeline.run_key` LIKE '{DAG}/{RUN2_DAY}/%'"

    # The run's partition is late: its sensor looks, finds nothing and gives its worker slot back.
    deadline = time.monotonic() + 120
    while _state(api, run_id, "wait_for_partition") != "up_for_reschedule":
        assert time.monotonic() < deadline, f"the sensor never waited: {_state(api, run_id, 'wait_for_partition')}"
        time.sleep(0.5)
    _generate(stack, RUN2_DAY, 1)  # the partition lands after the run started

    # Wait until the trial has finished (and checkpointed) its first epoch on the gpu worker, then crash it.
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the trial never finished an epoch"
        found = mlflow_client.get_experiment_by_name(TrackingConfig().experiment)
        runs = mlflow_client.search_runs([found.experiment_id], this_date) if found else []
        if runs and mlflow_client.get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        time.sleep(0.5)
    experiment = found.experiment_id
    train = next(ti for ti in api.task_instances(DAG, run_id) if ti["task_id"] == "train")
    assert _running_under_gpu_worker(stack, train)
    _crash_gpu_worker(stack)
    api.wait_for_run(DAG, run_id, timeout=300)

    tries = api.tries(DAG, run_id, "train", map_index=0)
    assert [(t["try_number"], t["state"], t["hostname"], t["queue"]) for t in tries] == [
        (1, "failed", "airflow-worker-gpu", "gpu"),
        (2, "success", "airflow-worker-gpu", "gpu"),
    ]
    # The retry resumed from the checkpoint instead of starting over.
    retry_log = api.task_log(DAG, run_id, "train", try_number=2, map_index=0)
    assert "resuming" in retry_log.lower(), retry_log[-2000:]
    # Nothing duplicated: one MLflow run for the (date, trial), finished, with every epoch; each registry
    # version comes from a different run.
    runs = mlflow_client.search_runs([experiment], this_date)
    assert [(r.info.status, r.data.metrics.get("epochs")) for r in runs] == [("FINISHED", float(epochs))]
    history = [m.step for m in mlflow_client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(history) == list(range(1, epochs + 1))
    versions = mlflow_client.search_model_versions(f"name = '{TrackingConfig().registered_model}'")
    assert len({v.run_id for v in versions}) == len(versions)
    # The summary says which partition the run waited for, and how long.
    summary = json.loads(s3.get_object(Bucket=stack_services.BUCKET, Key=f"output/runs/dt={RUN2_DAY}/summary.json")["Body"].read())
    assert [(w["date"], w["uri"]) for w in summary["partitions_waited"]] == [(RUN2_DAY, f"{CLICKS}/dt={RUN2_DAY}")]
    assert summary["partitions_waited"][0]["waited_s"] > 0


def _state(api: AirflowAPI, run_id: str, task_id: str) -> str | None:
    return next((ti["state"] for ti in api.task_instances(DAG, run_id) if ti["task_id"] == task_id), None)


# ---------------------------------------------------------------------------------------------
# Deadline alerts (pipeline.flow.alerts): a run made to overrun is reported by e-mail and webhook


def test_a_run_past_its_deadline_alerts_by_email_and_webhook(stack: stack_state.StackState) -> None:
    """The scheduler notices the missed deadline and the triggerer runs the pipeline's callback (~25 s)."""
    from alert_receivers import running_receivers

    api = stack.api()
    with running_receivers() as inbox:
        for name, value in inbox.connections().items():  # the channels, as connections in the metadata DB
            conn = json.loads(value)
            api.post("/connections", {
                "connection_id": name.removeprefix("AIRFLOW_CONN_").lower(), "conn_type": conn["conn_type"],
                "host": conn["host"], "port": conn["port"], "schema": conn.get("schema"),
                "password": conn.get("password"), "extra": json.dumps(conn.get("extra") or {}),
            })  # fmt: skip
        api.wait_for_dag("deadline_probe")
        run_id = api.trigger("deadline_probe", "2026-01-05T00:00:00+00:00", {})["dag_run_id"]
        inbox.wait_for(lambda r: bool(r.posts and r.mails), timeout=120)
        alert = inbox.posts[0]["json"]
        assert (alert["kind"], alert["dag_id"], alert["run_id"]) == ("deadline_missed", "deadline_probe", run_id)
        assert alert["details"]["state"] == "running"  # reported while the run was still going
        assert inbox.mails[0].recipients == ["oncall@example.test"] and "kind: deadline_missed" in inbox.mails[0].body
        assert api.wait_for_run("deadline_probe", run_id, timeout=120)["state"] == "success"
    assert len(inbox.posts) == len(inbox.mails) == 1  # one alert per missed deadline


# ---------------------------------------------------------------------------------------------
# Backfill (python -m pipeline backfill -> Airflow's /api/v2/backfills): two past dates, then the same again

# One trial of the module's small network: it must beat S-POP (an eligibility guard checked before the leakage one).
BACKFILL_CONF = {"grid": {"learning_rate": [0.1]}}


def _pipeline_cli(stack: stack_state.StackState, *args: str, timeout: float = 900) -> dict:
    """``python -m pipeline ARGS --stack HOME --json`` in its own process, as an operator runs it."""
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--stack", stack.home, "--json"],
        capture_output=True, text=True, timeout=timeout, cwd=HERE.parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _schedule_daily(stack: stack_state.StackState, api: AirflowAPI) -> None:
    """Airflow backfills only DAGs with a schedule. A daily one whose start_date lies in the future: the scheduler
    then makes no run of its own (there is no data for today here), while backfill runs, which Airflow gives
    every task whatever the start_date, run as in production."""
    path = Path(stack.home) / "pipeline-config.yaml"
    config = yaml.safe_load(path.read_text())
    config["airflow"] |= {"schedule": "@daily", "start_date": "2100-01-01"}
    path.write_text(yaml.safe_dump(config))
    api.put(f"/parseDagFile/{api.get(f'/dags/{DAG}')['file_token']}")  # parse it now
    probe = {"dag_id": DAG, "from_date": "2026-03-01T00:00:00+00:00", "to_date": "2026-03-01T00:00:00+00:00"}
    deadline = time.monotonic() + 180
    while True:  # until the serialized DAG a backfill reads has the schedule
        try:
            api.post("/backfills/dry_run", probe)
            break
        except AirflowAPIError as exc:
            assert "non-periodic" in str(exc) and time.monotonic() < deadline, f"DAG not re-parsed with a schedule: {exc}"
        time.sleep(2)
    api.patch(f"/dags/{DAG}", {"is_paused": False})  # backfill runs of a paused DAG wait


def _backfill_days(mlflow_client) -> list[str]:
    """Two consecutive past dates (a date's test window is its own day, its training data the days before): the
    newer one the first day the champion of the moment trained on, so its test window lies in the champion's
    training data (refused by the leakage guard); the older one the day before, whose test window ends before
    anything the champion saw (compared with it). Without a champion (this test alone) the newer date promotes the
    first model, whose training data is the older date's test window: the older one is refused."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry

    config = TrackingConfig()
    try:
        champion = mlflow_client.get_model_version_by_alias(config.registered_model, config.champion_alias)
        newer = dt.date.fromisoformat(champion.tags[registry.TAG_TRAIN_START][:10])
    except MlflowException:
        newer = dt.date(2026, 3, 1)
    return [str(newer - dt.timedelta(days=1)), str(newer)]


def _summary(s3, day: str) -> dict:
    return json.loads(s3.get_object(Bucket=stack_services.BUCKET, Key=f"output/runs/dt={day}/summary.json")["Body"].read())


def _registry_state(mlflow_client, days: list[str]) -> dict:
    """Versions (with their source runs), aliases, decision records and training runs of the backfilled dates."""
    name = TrackingConfig().registered_model
    experiment = mlflow_client.get_experiment_by_name(TrackingConfig().experiment).experiment_id
    training = [r for d in days for r in mlflow_client.search_runs(  # one query per date: no OR in MLflow
        [experiment], f"tags.`pipeline.kind` = 'training' and tags.`pipeline.run_key` LIKE '{DAG}/{d}/%'")]  # fmt: skip
    return {
        "versions": sorted((v.version, v.run_id) for v in mlflow_client.search_model_versions(f"name = '{name}'")),
        "aliases": dict(mlflow_client.get_registered_model(name).aliases),
        "decisions": sorted(r.info.run_id for r in mlflow_client.search_runs([experiment], "tags.`pipeline.kind` = 'promotion'")),
        "training_runs": sorted((r.data.tags["pipeline.run_key"], r.info.status) for r in training),
    }


@pytest.mark.timeout(1200)
def test_backfill_of_two_past_dates_is_idempotent_and_keeps_the_leakage_guard(
    stack: stack_state.StackState, clicks: str, s3, mlflow_client
) -> None:
    from pipeline.data.generate import generate_clicks
    from pipeline.tracking import registry
    from pipeline.tracking.decision import LEAKAGE_REASON, TimeWindow, leakage

    api = stack.api()
    api.wait_for_dag(DAG, timeout=120)
    with pytest.MonkeyPatch.context() as mp:  # the days before the module's data: the earliest dates' windows
        for key, value in stack.client_env().items():
            mp.setenv(key, value)
        # The module's seed: the same item catalogue and sequential patterns as the days after.
        generate_clicks(CLICKS, days=3, start_date="2026-02-26", sessions_per_day=800, n_items=300, seed=3)
    _schedule_daily(stack, api)
    days = _backfill_days(mlflow_client)
    span = ["backfill", "--from", days[0], "--to", days[-1], "--conf", json.dumps(BACKFILL_CONF)]

    # Newest date first, one at a time: each date meets the champion the one before left.
    first = _pipeline_cli(stack, *span, "--backwards", "--wait", "900")
    assert first["dates"] == days and first["completed"]
    runs = {r["date"]: r for r in first["runs"]}
    assert {d: (runs[d]["run_type"], runs[d]["state"]) for d in days} == {d: ("backfill", "success") for d in days}

    # The leakage guard: a date whose test window the champion of the moment trained on is refused, and only then
    # (checked against the champion's training window as the registry records it).
    name = TrackingConfig().registered_model
    refused, records = [], {}
    for day in days:
        decision = _summary(s3, day)["decision"]
        assert decision["date"] == day and decision["candidates"], decision
        assert "does not beat" not in decision["reason"], f"{day}: the candidate did not reach the leakage guard: {decision['reason']}"
        records[day] = decision["record_run_id"]
        if not decision["champion_version"]:
            assert decision["action"] == "promoted", decision  # the first model of an empty registry
            continue
        tags = mlflow_client.get_model_version(name, decision["champion_version"]).tags
        trained = TimeWindow(tags[registry.TAG_TRAIN_START], tags[registry.TAG_TRAIN_END])
        seen = leakage(TimeWindow(**decision["test_window"]), trained)
        assert (decision["action"] == "refused" and LEAKAGE_REASON in decision["reason"]) == (seen is not None), decision
        if seen:
            refused.append(day)
    assert refused, "no backfilled date was refused: the leakage guard was not exercised"
    before = _registry_state(mlflow_client, days)
    assert len(before["training_runs"]) == len(days) and {s for _, s in before["training_runs"]} == {"FINISHED"}

    # The same backfill again: every date has a run, Airflow creates none.
    again = _pipeline_cli(stack, *span, "--wait", "120")
    assert again["dates"] == [] and again["completed"]
    assert [(r["run_id"], r["state"]) for r in again["runs"]] == [(r["run_id"], r["state"]) for r in first["runs"]]

    # Forced (--rerun: every task of every date runs again, both dates at once): nothing registered, compared,
    # moved or logged twice: the same versions, aliases, decision records and one training run per date.
    rerun = _pipeline_cli(stack, *span, "--rerun", "--max-active-runs", str(len(days)), "--wait", "900")
    assert rerun["dates"] == days and {r["state"] for r in rerun["runs"]} == {"success"}
    for r in rerun["runs"]:
        assert len(api.tries(DAG, r["run_id"], "promote")) == 2, "the date's promote task did not run again"
        assert _summary(s3, r["date"])["decision"]["record_run_id"] == records[r["date"]]  # the recorded decision
    assert _registry_state(mlflow_client, days) == before

    # The status screen (REST API path) shows the backfill's runs, the champion and the decisions.
    status = _pipeline_cli(stack, "status", "--runs", "20", timeout=300)["sections"]
    assert {s: status[s]["error"] for s in status} == dict.fromkeys(status)
    shown = {r["date"]: (r["run_type"], r["state"]) for r in status["runs"]["rows"]}
    assert {d: shown.get(d) for d in days} == {d: ("backfill", "success") for d in days}
    # The metadata DB (what status reads where no REST API is configured) holds the same runs.
    from pipeline.flow.dag_runs import AirflowSource, dag_runs

    in_db = dag_runs(AirflowSource(db_url=stack_db.postgres_url(stack.airflow_db, "postgresql+psycopg2")), DAG, 20)
    assert [(r["run_id"], r["state"], r["date"]) for r in in_db] == [
        (r["run_id"], r["state"], r["date"]) for r in status["runs"]["rows"]
    ]
    champion = next(m for m in status["models"]["rows"] if m["alias"] == "champion")
    assert champion["version"] == before["aliases"]["champion"]
    assert {d["date"] for d in status["decisions"]["rows"]} >= set(days)
