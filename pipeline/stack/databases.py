"""The machine's own PostgreSQL and Redis, shared by stacks and tests: a database per stack, a Redis number per broker.

``up`` creates two PostgreSQL databases (Airflow metadata, MLflow backend) and claims an empty Redis database
number with a marker key, so two stacks on one machine never share a broker; ``down`` drops and releases them.
Tests get throwaway databases from :func:`scratch_database`. The drivers are imported where used (they are
not needed to import the stack's modules, which Airflow does for its ``hostname_callable``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from pipeline.stack.state import StackError

POSTGRES: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS = ("127.0.0.1", 6379)
REDIS_CLAIM_KEY = "pipeline-localstack:owner"


def postgres_url(db: str, driver: str = "postgresql") -> str:
    return f"{driver}://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{db}"


def _pg_admin() -> Any:
    import psycopg2  # a driver, not needed to import the stack (see the module docstring)

    conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    conn.autocommit = True
    return conn


def _admin_execute(statements: Iterable[str]) -> None:
    """Run statements on the ``postgres`` maintenance database (an unreachable server is a clear StackError)."""
    try:
        conn = _pg_admin()
    except Exception as exc:
        raise StackError(
            f"cannot reach PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} as {POSTGRES['user']}: {exc}"
        ) from None
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def create_databases(names: Iterable[str]) -> None:
    _admin_execute(f'CREATE DATABASE "{name}"' for name in names)


def drop_databases(names: Iterable[str]) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names)


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, uniquely named PostgreSQL database for the duration of the block (tests, throwaway stacks)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    create_databases([name])
    try:
        yield postgres_url(name)
    finally:
        drop_databases([name])


def redis_client(db: int) -> Any:
    import redis  # a driver, not needed to import the stack (see the module docstring)

    return redis.Redis(host=REDIS[0], port=REDIS[1], db=db, socket_timeout=5)


def claim_redis_db(owner: str) -> int:
    """An empty Redis database number (1..15), claimed with a marker key so two stacks never share a broker."""
    try:
        count = int(redis_client(0).config_get("databases").get("databases", 16))
    except Exception as exc:
        raise StackError(f"cannot reach Redis at {REDIS[0]}:{REDIS[1]}: {exc}") from None
    for db in range(1, count):
        r = redis_client(db)
        if r.dbsize() == 0 and r.set(REDIS_CLAIM_KEY, owner, nx=True):
            return db
    raise StackError(f"no empty Redis database left on {REDIS[0]}:{REDIS[1]} (1..{count - 1} all in use)")


def release_redis_db(db: int, owner: str) -> None:
    r = redis_client(db)
    claimed = r.get(REDIS_CLAIM_KEY)
    if claimed is not None and claimed.decode() == owner:
        r.flushdb()  # only our own database: broker queues and the claim
