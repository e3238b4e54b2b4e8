"""The deployment's topology as local processes (Airflow, Celery workers, MLflow, SeaweedFS) for tests and demos.

Development tooling: nothing in the runtime path (DAG, task bodies, stages) imports it; only the CLI's
operator commands and the tests do. ``local`` (the ``stack.sh`` commands and Airflow's ``hostname_callable``)
builds on ``services`` (what runs: commands, policy, wiring), ``state`` (``stack.json``), ``environment``
(each service's settings), ``databases`` (PostgreSQL and Redis), ``supervisor`` (start, stop, readiness),
``processes`` (the one process-stop helper) and ``s3server`` (SeaweedFS).
"""
