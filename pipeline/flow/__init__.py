"""Orchestration: the DAG's task bodies, alerts, retention, backfill, status and the local demo.

The only layer that composes stages; Airflow-facing code converts typed contracts to and from JSON here.
"""
