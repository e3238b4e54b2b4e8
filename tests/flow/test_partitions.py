"""The late-data sensor's logic (pipeline.data.partitions) without Airflow: when a partition is ready, the wait
record, and the failure message after the timeout. The sensor itself runs in test_late_data.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pipeline.config import AirflowConfig
from pipeline.data import partitions
from pipeline.errors import ConfigError, InputError

T0 = dt.datetime(2026, 3, 4, 0, 5, tzinfo=dt.UTC)


def _run(tmp_path: Path, start: str = "2026-03-03", end: str = "2026-03-03") -> dict[str, str]:
    return {
        "run_id": "manual__1",
        "date": end,
        "window_start": start,
        "data_uri": str(tmp_path / "clicks"),
        "output_uri": str(tmp_path / "out"),
    }


def _write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_ready_needs_a_data_file_and_the_marker_when_one_is_configured(tmp_path: Path) -> None:
    part = tmp_path / "dt=2026-03-03"
    assert partitions.check_partition("2026-03-03", str(part)).missing() == f"{part} does not exist"
    part.mkdir()
    _write(part / ".events.parquet.tmp-1")  # a writer's temporary file is not data...
    _write(part / "README.txt")  # ...nor is a note beside the data
    check = partitions.check_partition("2026-03-03", str(part))
    assert not check.ready and check.missing() == f"{part} holds no data file"
    _write(part / "events.parquet")
    assert partitions.check_partition("2026-03-03", str(part)).ready
    check = partitions.check_partition("2026-03-03", str(part), "_SUCCESS")
    assert (
        not check.ready and check.missing() == f"{part} exists but its completion marker _SUCCESS is missing"
    )
    _write(part / "_SUCCESS", "")
    assert partitions.check_partition("2026-03-03", str(part), "_SUCCESS").ready


def test_a_late_partition_is_recorded_with_how_long_it_was_waited_for(tmp_path: Path) -> None:
    run = _run(tmp_path, start="2026-03-02")
    policy = partitions.WaitPolicy(poke_interval_s=60, timeout_s=3600)
    _write(tmp_path / "clicks" / "dt=2026-03-02" / "a.tsv")  # already there: not waited for

    first = partitions.poke(run, policy, first_poke=None, now=T0)
    assert first["state"] == "waiting"
    assert [(p["date"], p["ready"]) for p in first["partitions"]] == [
        ("2026-03-02", True),
        ("2026-03-03", False),
    ]
    assert partitions.read_record(run) == first  # written at every look: a status screen sees the wait

    _write(tmp_path / "clicks" / "dt=2026-03-03" / "a.tsv")
    done = partitions.poke(run, policy, first_poke=T0, now=T0 + dt.timedelta(minutes=25))
    assert done["state"] == "ready" and done["waited_s"] == 1500
    assert partitions.waited_for(done) == [
        {"date": "2026-03-03", "uri": str(tmp_path / "clicks" / "dt=2026-03-03"), "waited_s": 1500}
    ]
    # A record left by another run of the same date is not this run's.
    assert partitions.read_record({**run, "run_id": "manual__2"}) is None


def test_after_the_timeout_the_failure_names_the_partition_the_wait_and_the_marker(tmp_path: Path) -> None:
    run = _run(tmp_path, start="2026-03-02")
    _write(tmp_path / "clicks" / "dt=2026-03-02" / "a.tsv")  # data, but no marker
    policy = partitions.WaitPolicy.from_config(
        AirflowConfig(partition_poke_minutes=5, partition_timeout_hours=6, partition_marker="_SUCCESS")
    )
    assert partitions.poke(run, policy, first_poke=T0, now=T0 + dt.timedelta(hours=5.9))["state"] == "waiting"
    with pytest.raises(InputError) as failure:
        partitions.poke(run, policy, first_poke=T0, now=T0 + dt.timedelta(hours=6, minutes=2))
    clicks = tmp_path / "clicks"
    assert str(failure.value) == (
        f"no partition dt=2026-03-02, dt=2026-03-03 after 6 h: {clicks / 'dt=2026-03-02'} exists but its "
        f"completion marker _SUCCESS is missing; {clicks / 'dt=2026-03-03'} does not exist "
        "(airflow.partition_timeout_hours=6; clear the task to wait again)"
    )
    assert partitions.read_record(run)["state"] == "timed_out"


def test_wait_settings_are_checked() -> None:
    policy = partitions.WaitPolicy.from_config(AirflowConfig())
    assert (policy.poke_interval_s, policy.timeout_s, policy.marker) == (300, 6 * 3600, "")
    assert policy.sensor_timeout_s > policy.timeout_s  # Airflow's generic timeout never pre-empts ours
    with pytest.raises(ConfigError, match="partition_timeout_hours must be > 0"):
        partitions.WaitPolicy.from_config(AirflowConfig(partition_timeout_hours=0))
    with pytest.raises(ConfigError, match="partition_marker must be a file name"):
        partitions.WaitPolicy.from_config(AirflowConfig(partition_marker="done/_SUCCESS"))
    assert [partitions.duration_text(s) for s in (4, 90, 5400, 6 * 3600)] == [
        "4 s",
        "1.5 min",
        "1.5 h",
        "6 h",
    ]
