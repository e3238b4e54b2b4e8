"""Lineage of a training run: the time windows its data covers and its test split, read back exactly.

The windows come from the dataset manifest the run logged as ``data.*`` params (:mod:`pipeline.tracking.training`);
promotion uses them for the leakage guard. :func:`read_test_split` re-reads the candidate's test split and checks
it against the fingerprint and SHA-256 the run recorded, so a champion is never re-evaluated on other data.

It reads the dataset's manifest with :func:`pipeline.data.sessions.read_manifest`: a record (the committed
dataset's identity and file hashes), the one way to find and check the test file; no dataset is built here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.sessions import read_manifest
from pipeline.errors import InputError, PromotionError
from pipeline.tracking.decision import TimeWindow
from pipeline.tracking.runs import TAG_DATA_URI, TAG_FINGERPRINT

if TYPE_CHECKING:
    from mlflow.entities import Run


# ---------------------------------------------------------------------------------------------
# Time windows (from the dataset manifest the training run logged as data.* params)


def _param_time(params: Mapping[str, str], key: str) -> str | None:
    value = params.get(key)
    return value if value and value != "None" else None


def training_window(run: Run) -> TimeWindow | None:
    """First train event .. last train or valid event of the run's dataset: everything the model has seen."""
    p = run.data.params
    start = _param_time(p, "data.time_ranges.train.start")
    ends = [
        t
        for t in (_param_time(p, "data.time_ranges.train.end"), _param_time(p, "data.time_ranges.valid.end"))
        if t
    ]
    if start is None or not ends:
        return None
    return TimeWindow(start, max(ends, key=lambda t: TimeWindow(t, t).bounds()[0]))


def test_window(run: Run) -> TimeWindow | None:
    """The period the run's test sessions end in: the split's cut .. the dataset's last event.

    Sessions are split by their end, so a test session may start before the cut; the cut, not its first
    event, is what separates it from data another model trained on.
    """
    p = run.data.params
    start = _param_time(p, "data.split_times.test_start") or _param_time(p, "data.time_ranges.test.start")
    end = _param_time(p, "data.split_times.latest_event") or _param_time(p, "data.time_ranges.test.end")
    return TimeWindow(start, end) if start and end else None


# ---------------------------------------------------------------------------------------------
# The test split, as it was


def read_test_split(run: Run) -> pa.Table:
    """The candidate's test split, exactly as it was when the candidate was tested.

    The dataset's manifest must still carry the fingerprint the run recorded, and the test file's bytes
    must hash to the manifest's SHA-256; otherwise the dataset was rebuilt (or is being republished) and
    the champion would be re-evaluated on other data than the candidate's logged ranks: fail clearly.
    """
    run_id = run.info.run_id
    data_uri = run.data.tags.get(TAG_DATA_URI)
    expected = run.data.tags.get(TAG_FINGERPRINT)
    if not data_uri or not expected:
        raise PromotionError(
            f"candidate run {run_id} does not record its dataset ({TAG_DATA_URI}, {TAG_FINGERPRINT}): cannot check "
            "that the champion is evaluated on the same test split"
        )
    try:
        manifest = read_manifest(data_uri)
        found = manifest.get("fingerprint")
        if found != expected:
            raise PromotionError(
                f"dataset {data_uri} changed since candidate run {run_id} was tested on it: its fingerprint is "
                f"{found}, the run recorded {expected}; the champion would be evaluated on other test data. "
                "Train the candidate again on this dataset, or restore the dataset it was tested on"
            )
        entry = manifest["files"]["test"]
        uri = storage.join(data_uri, *str(entry["path"]).split("/"))
        data = storage.read_bytes(uri)
    except InputError as exc:
        raise PromotionError(f"cannot read the test split of candidate run {run_id}: {exc}") from None
    except (KeyError, TypeError):
        raise PromotionError(
            f"the manifest of {data_uri} lists no test file with a sha256 (files.test)"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise PromotionError(
            f"test split {uri} has SHA-256 {digest[:16]}..., its manifest says {str(entry.get('sha256'))[:16]}...: "
            "the file was changed after the dataset was published; rebuild the dataset"
        )
    return pq.read_table(pa.BufferReader(data))
