"""A pluggable alert for the DAG tests (``PIPELINE_ALERT_CALLBACK=dag_test_alerts:record``): one line per alert."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def record(message: str, context: Mapping[str, Any]) -> None:
    with open(os.environ["DAG_TEST_ALERTS"], "a", encoding="utf-8") as out:
        out.write(message.replace("\n", " ") + "\n")
