"""The deployment's topology as local processes (Airflow, Celery workers, MLflow, SeaweedFS) for tests and demos.

Development tooling: nothing in the runtime path (DAG, task bodies, stages) imports it; only the CLI's
operator commands and the tests do.
"""
