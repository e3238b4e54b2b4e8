#!/usr/bin/env bash
# Runs once, on the first start of the postgres container (/docker-entrypoint-initdb.d): one database and
# one owner each for the Airflow metadata and the MLflow backend. Passwords come from the environment.
set -euo pipefail
: "${AIRFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username postgres \
  -v airflow_pw="$AIRFLOW_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER airflow WITH PASSWORD :'airflow_pw';
CREATE DATABASE airflow OWNER airflow;
CREATE USER mlflow WITH PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
