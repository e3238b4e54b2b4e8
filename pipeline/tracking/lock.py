"""The registry-wide promotion lock: one decision or operator lever moves the aliases at a time.

The lock is a registered model named ``<model>.promotion-lock``: creating a registered model is atomic in every
MLflow backend (a unique name), so it works the same on SQLite, PostgreSQL and through a tracking server. A lock
older than ``stale_s`` (its holder died) is broken with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException

from pipeline.errors import PromotionError
from pipeline.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def lock_name(model_name: str) -> str:
    """The registered model that is the lock of ``model_name``."""
    return f"{model_name}.promotion-lock"


@contextmanager
def promotion_lock(
    client: MlflowClient,
    model_name: str,
    *,
    timeout_s: float = 900.0,
    stale_s: float = 3600.0,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """Hold the registry-wide promotion lock of ``model_name`` (see the module docstring)."""
    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    holder = ""

    def acquired() -> bool:
        nonlocal holder
        try:
            client.create_registered_model(
                name,
                tags={"pipeline.lock_owner": owner},
                description=f"Lock held while a promotion of {model_name!r} moves its aliases; deleted when it ends.",
            )
            return True
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: the SQL store looks the existing lock up after its insert
            # collides, and the holder may release it in between. Both mean "contended, retry".
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _break_if_stale(client, name, stale_s)
        return False

    try:  # waiters that collided retry at spread-out times (jitter)
        wait_until(acquired, timeout_s, poll_s, f"promotion lock {name!r}", jitter=0.5)
    except WaitTimeout:
        raise PromotionError(
            f"timed out after {timeout_s:.0f}s waiting for the promotion lock {name!r} (held by {holder}); "
            f"if no promotion is running, delete that registered model"
        ) from None
    log.debug("promotion lock %s acquired by %s", name, owner)
    try:
        yield owner
    finally:
        _release(client, name, owner)


def _break_if_stale(client: MlflowClient, name: str, stale_s: float) -> str:
    try:
        lock = client.get_registered_model(name)
    except MlflowException:
        return "nobody (just released)"
    holder = lock.tags.get("pipeline.lock_owner", "unknown")
    age_s = time.time() - lock.creation_timestamp / 1000.0
    if age_s > stale_s:
        log.warning(
            "breaking promotion lock %s held by %s for %.0fs (stale after %.0fs)",
            name,
            holder,
            age_s,
            stale_s,
        )
        _release(client, name, holder)
    return holder


def _release(client: MlflowClient, name: str, owner: str) -> None:
    try:
        lock = client.get_registered_model(name)
        if lock.tags.get("pipeline.lock_owner") == owner:
            client.delete_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
