"""A DAG made to overrun its deadline (tests/stack/test_stack.py): the pipeline's deadline alert
(``pipeline.flow.alerts.deadline``, as ``dags/gru4rec_daily.py`` builds it) set to 5 s after the run was queued,
and one task that sleeps 20 s. The scheduler notices the missed deadline, the triggerer runs the callback,
which sends the alert through the e-mail and webhook connections the test creates."""

from __future__ import annotations

from airflow.sdk import dag, task

from pipeline.config import PipelineConfig, from_mapping
from pipeline.flow import alerts

ALERTS = {
    "email_to": ["oncall@example.test"],
    "smtp_conn_id": "alerts_smtp_test",
    "webhook_conn_id": "alerts_webhook_test",
    "deadline_hours": 5 / 3600,
}


@dag(
    dag_id="deadline_probe",
    schedule=None,
    catchup=False,
    max_active_runs=1,
    deadline=alerts.deadline(from_mapping(PipelineConfig, {"alerts": ALERTS})),
    tags=["infra-test"],
    doc_md=__doc__,
)
def deadline_probe():
    @task(queue="default")
    def overrun() -> None:
        import time

        time.sleep(20)

    overrun()


deadline_probe()
