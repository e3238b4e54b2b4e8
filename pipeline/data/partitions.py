"""Late data: is a run's ``dt=YYYY-MM-DD/`` click-log partition ready, and what the wait for it was.

The DAG's sensor (``wait_for_partition``, reschedule mode: no worker slot is held between looks) calls
:func:`poke` once per look. A partition is ready when its folder (local) or prefix (``s3://``) holds a
data file and, when ``airflow.partition_marker`` names one (e.g. ``_SUCCESS``), that marker too. Each look
writes the wait record (``runs/dt=DAY/partition_wait.json`` under the output root): which partitions the
run waited for, since when and for how long, so a status screen can show a wait in progress and the
summary can say what was waited for. After ``airflow.partition_timeout_hours`` the look raises
:class:`InputError` ("no partition dt=X after N h"), which fails the run without retries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.config import AirflowConfig
from pipeline.errors import InputError

RECORD_NAME = "partition_wait.json"
# pipeline.storage (pyarrow) is imported inside the functions that look: the DAG file reads WaitPolicy
# while it is parsed, and parsing must stay free of heavy imports.


@dataclass(frozen=True)
class WaitPolicy:
    """How the sensor waits: how often it looks, for how long, and for which completion marker."""

    poke_interval_s: float
    timeout_s: float
    marker: str = ""

    @classmethod
    def from_config(cls, cfg: AirflowConfig) -> WaitPolicy:
        """The policy of a checked ``airflow`` section (pipeline.config checks these settings when it is built)."""
        marker = cfg.partition_marker.strip().strip("/")
        return cls(cfg.partition_poke_minutes * 60.0, cfg.partition_timeout_hours * 3600.0, marker)

    @property
    def sensor_timeout_s(self) -> float:
        """Airflow's own sensor timeout: one look later than ours, so our clearer message always wins."""
        return self.timeout_s + self.poke_interval_s + 60.0


@dataclass(frozen=True)
class PartitionCheck:
    """What one look found in one partition."""

    date: str
    uri: str
    has_data: bool  # at least one file ingest reads (not hidden, ``_`` or non-data names such as README.txt)
    marker: str  # "" = none required
    has_marker: bool

    @property
    def ready(self) -> bool:
        return self.has_data and (not self.marker or self.has_marker)

    def missing(self) -> str:
        """What is not there yet, in words."""
        from pipeline import storage

        if not self.has_data and not storage.exists(self.uri):
            return f"{self.uri} does not exist"
        if not self.has_data:
            return f"{self.uri} holds no data file"
        return f"{self.uri} exists but its completion marker {self.marker} is missing"


def check_partition(day: str, uri: str, marker: str = "") -> PartitionCheck:
    """Look once at one partition (a missing folder or prefix is simply not ready)."""
    # Imported here: status screens and the sensor import this module for its records, without pyarrow.
    from pipeline import storage
    from pipeline.data.inputs import is_data_file

    try:
        has_data = bool(storage.list_files(uri, accept=is_data_file))
    except InputError:  # not found
        has_data = False
    has_marker = bool(marker) and storage.exists(storage.join(uri, marker))
    return PartitionCheck(day, uri, has_data, marker, has_marker)


def required_days(run: Mapping[str, Any]) -> list[str]:
    """The days a run cannot start without: ``window_start`` .. the run's date (usually just its date)."""
    start = dt.date.fromisoformat(run["window_start"])
    end = dt.date.fromisoformat(run["date"])
    return [(start + dt.timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def record_uri(output_uri: str, day: str) -> str:
    """Where the wait record of the run for ``day`` lives (beside its summary.json)."""
    return "/".join([output_uri.rstrip("/"), "runs", f"dt={day}", RECORD_NAME])


def duration_text(seconds: float) -> str:
    """A duration as people read it: "6 h", "1.5 h", "20 min", "8 s"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:.3g} s"


def timeout_message(checks: Sequence[PartitionCheck], policy: WaitPolicy) -> str:
    """The failure a person reads: which partitions, after how long, and what exactly is missing."""
    late = [c for c in checks if not c.ready]
    days = ", ".join(f"dt={c.date}" for c in late)
    what = "; ".join(c.missing() for c in late)
    return (
        f"no partition {days} after {duration_text(policy.timeout_s)}: {what} "
        f"(airflow.partition_timeout_hours={policy.timeout_s / 3600:g}; clear the task to wait again)"
    )


def read_record(run: Mapping[str, Any]) -> dict[str, Any] | None:
    """This run's wait record, if its sensor wrote one (a record of another run of the same date is not)."""
    from pipeline import storage

    uri = record_uri(run["output_uri"], run["date"])
    if not storage.exists(uri):
        return None
    record = storage.read_json(uri)
    return record if record.get("run_id") == run["run_id"] else None


def poke(
    run: Mapping[str, Any],
    policy: WaitPolicy,
    *,
    first_poke: dt.datetime | None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """One look at the run's required partitions; returns the wait record (``state`` "ready" or "waiting").

    ``first_poke`` is when this wait began (Airflow's first reschedule date; None on the first look).
    Raises InputError once the wait has lasted ``policy.timeout_s`` with a partition still not ready.
    """
    from pipeline import storage

    now = now or dt.datetime.now(dt.UTC)
    since = first_poke or now
    waited_s = max(0.0, (now - since).total_seconds())
    uri = record_uri(run["output_uri"], run["date"])
    previous = read_record(run) if first_poke else None
    # A partition keeps the wait of the look that first found it ready (0 when that was the first look).
    earlier = {p["date"]: p for p in (previous or {}).get("partitions", []) if p["ready"]}
    checks = [
        check_partition(day, "/".join([run["data_uri"].rstrip("/"), f"dt={day}"]), policy.marker)
        for day in required_days(run)
    ]
    partitions = []
    for check in checks:
        entry = {**asdict(check), "ready": check.ready, "ready_at": None, "waited_s": round(waited_s, 3)}
        if check.ready and check.date in earlier:
            entry.update(ready_at=earlier[check.date]["ready_at"], waited_s=earlier[check.date]["waited_s"])
        elif check.ready:
            entry["ready_at"] = now.isoformat()
        partitions.append(entry)
    ready = all(c.ready for c in checks)
    timed_out = not ready and waited_s >= policy.timeout_s
    record = {
        "run_id": run["run_id"],
        "date": run["date"],
        "state": "ready" if ready else "timed_out" if timed_out else "waiting",
        "since": since.isoformat(),
        "checked_at": now.isoformat(),
        "waited_s": round(waited_s, 3),
        "poke_interval_s": policy.poke_interval_s,
        "timeout_s": policy.timeout_s,
        "marker": policy.marker,
        "partitions": partitions,
    }
    storage.write_json(uri, record)
    if timed_out:
        raise InputError(timeout_message(checks, policy))
    return record


def waited_for(record: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The partitions a run had to wait for (not there at its first look), with how long: for the summary."""
    return [
        {"date": p["date"], "uri": p["uri"], "waited_s": p["waited_s"]}
        for p in (record or {}).get("partitions", [])
        if p["waited_s"] > 0
    ]
