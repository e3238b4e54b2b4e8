"""Retention: delete outputs older than their configured age, never what the current models came from.

What ages out, by the ``dt=YYYY-MM-DD`` folder each output is addressed by (``pipeline.flow.tasks`` lays them out
under the output root; ages in ``retention.*_days`` of the config, 0 = keep forever):

====================  ==========================================================  ===================
kind                  where                                                       setting
====================  ==========================================================  ===================
``dataset``           ``OUT/datasets/dt=D/``                                      ``datasets_days``
``validated``         ``OUT/validated/dt=D/`` except ``quarantine/``              ``validated_days``
``quarantine``        ``OUT/validated/dt=D/quarantine/``                          ``quarantine_days``
``model``             ``OUT/models/dt=D/<data>/<trial>/``                         ``models_days``
``scratch``           ``$PIPELINE_HOME/work/<bucket>/<prefix>/models/dt=D/...``   ``scratch_days``
====================  ==========================================================  ===================

An output of day D is older than N days when ``D < today - N``. Protected, whatever their age: the lineage of
the versions behind ``@champion`` and ``@challenger``: the dataset of their training run (tag ``data.uri``),
every validated partition that dataset was built from (its ``manifest.json`` ``inputs``: report, clean rows,
Data Docs and quarantine) and the trial's model folder and scratch (from the run key the DAG gives each
trial: ``<dag>/<date>/<data fingerprint>/<trial>``). When the registry cannot be read, nothing is deleted.

:func:`plan` lists what would go (with bytes); :func:`apply` deletes it. ``python -m pipeline retention
[--dry-run] [--json]`` and the DAG's last task call both.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig, RetentionConfig, pipeline_home
from pipeline.data.validation_output import CLEAN, QUARANTINE  # folder names only; no GX behind them
from pipeline.errors import PipelineError
from pipeline.flow.outputs import children_except, day_folders, subfolders, usage
from pipeline.flow.settings import config_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One folder that ages out (or is kept because the champion or challenger needs it)."""

    kind: str  # dataset | validated | quarantine | model | scratch
    uri: str
    day: str
    bytes: int
    files: int
    protected_by: str = ""  # "" = deleted; else which model's lineage keeps it


@dataclass
class Plan:
    """What retention deletes on ``today``, what it keeps although old, and the lineage it protected."""

    today: str
    output_uri: str
    delete: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)
    lineage: dict[str, list[str]] = field(default_factory=dict)  # "champion v3" -> protected URIs
    deleted: bool = False

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.delete)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes"] = self.bytes
        return out


# ---------------------------------------------------------------------------------------------
# Lineage of the current models


@dataclass(frozen=True)
class Lineage:
    """The outputs one registered version depends on (URIs normalized)."""

    label: str  # e.g. "champion v3"
    dataset: str | None
    validated: tuple[str, ...]
    model_dirs: tuple[str, ...]  # relative to the models root: dt=D/<data>/<trial>

    def uris(self) -> list[str]:
        return [u for u in (self.dataset, *self.validated) if u] + list(self.model_dirs)


def _validation_folder(uri: str) -> str:
    # build records a validated input as the validation folder or its clean/ folder.
    folder = storage.parent(uri) if storage.basename(uri.rstrip("/")) == CLEAN else uri
    return storage.normalize(folder)


def dataset_inputs(dataset_uri: str) -> list[str]:
    """The validated partitions a dataset was built from (its manifest's ``inputs``); [] when unreadable."""
    from pipeline.data.sessions import read_manifest

    try:
        manifest = read_manifest(dataset_uri)
    except PipelineError as exc:
        log.warning("lineage: cannot read the manifest of %s (%s): its inputs are unknown", dataset_uri, exc)
        return []
    return [_validation_folder(u) for u in manifest.get("inputs") or []]


def model_dir_of(run_key: str) -> str | None:
    """``dt=D/<data>/<trial>`` of a trial from its run key ``<dag>/<date>/<data>/<trial>`` (None if not one)."""
    parts = run_key.split("/")
    if len(parts) < 4 or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[-3]):
        return None
    return f"dt={parts[-3]}/{parts[-2]}/{parts[-1]}"


def current_lineage(cfg: PipelineConfig) -> list[Lineage]:
    """The lineage of ``@champion`` and ``@challenger`` from the registry and their training runs.

    Raises :class:`PipelineError` when the registry cannot be read: retention must not guess.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import registry
    from pipeline.tracking import runs as tracking

    tcfg = cfg.tracking
    try:
        tracking.configure(tcfg)
        client = mlflow.MlflowClient()
        versions = {
            alias: registry.champion_version(client, tcfg.registered_model, alias)
            for alias in (tcfg.champion_alias, tcfg.challenger_alias)
        }
    except MlflowException as exc:
        raise PipelineError(
            f"retention: cannot read the registry at {tracking.tracking_uri()} ({exc}); nothing deleted"
        ) from None
    out = []
    for alias, version in versions.items():
        if version is None:
            continue
        tags = dict(version.tags or {})
        run_tags: dict[str, str] = {}
        try:
            run_tags = dict(client.get_run(version.run_id or "").data.tags)
        except MlflowException as exc:
            log.warning(
                "lineage: %s v%s: run %s not readable (%s)", alias, version.version, version.run_id, exc
            )
        dataset = tags.get(tracking.TAG_DATA_URI) or run_tags.get(tracking.TAG_DATA_URI)
        model_dir = model_dir_of(run_tags.get(tracking.TAG_RUN_KEY, ""))
        out.append(
            Lineage(
                label=f"{alias} v{version.version}",
                dataset=storage.normalize(dataset) if dataset else None,
                validated=tuple(dataset_inputs(dataset)) if dataset else (),
                model_dirs=(model_dir,) if model_dir else (),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# What ages out


def scratch_root(output_uri: str) -> Path | None:
    """Where training checkpoints of an ``s3://`` output root live on a worker (``tasks._work_dir``)."""
    if "://" not in output_uri:
        return None  # local output roots keep checkpoints in the model folder itself
    return pipeline_home() / "work" / output_uri.split("://", 1)[1].strip("/") / "models"


def _cutoff(today: dt.date, days: int) -> str | None:
    return (today - dt.timedelta(days=days)).isoformat() if days else None


def _protector(uri: str, protected: Mapping[str, str]) -> str:
    """Which lineage keeps ``uri``: a protected URI equal to it, inside it or around it."""
    target = storage.normalize(uri).rstrip("/") + "/"
    for other, label in protected.items():
        o = other.rstrip("/") + "/"
        if o.startswith(target) or target.startswith(o):
            return label
    return ""


def plan(
    cfg: PipelineConfig, output_uri: str, today: dt.date, lineage: Iterable[Lineage] | None = None
) -> Plan:
    """What retention would delete under ``output_uri`` on ``today`` (nothing is deleted here).

    ``lineage`` defaults to the registry's current champion and challenger (:func:`current_lineage`).
    """
    rcfg: RetentionConfig = cfg.retention
    lineages = list(current_lineage(cfg) if lineage is None else lineage)
    out = storage.normalize(output_uri)
    protected: dict[str, str] = {}
    for lin in lineages:
        for uri in (lin.dataset, *lin.validated):
            if uri:
                protected[storage.normalize(uri)] = lin.label
        for rel in lin.model_dirs:
            protected[storage.normalize(storage.join(out, "models", *rel.split("/")))] = lin.label
            root = scratch_root(out)
            if root is not None:
                protected[str(root.joinpath(*rel.split("/")))] = lin.label
    result = Plan(today.isoformat(), out, lineage={lin.label: lin.uris() for lin in lineages})

    def consider(kind: str, uri: str, day: str, days: int, skip: str | None = None) -> None:
        cutoff = _cutoff(today, days)
        if cutoff is None or day >= cutoff:
            return
        size, files = usage(uri, skip)
        if not files:
            return
        keeper = _protector(uri, protected)
        (result.kept if keeper else result.delete).append(Item(kind, uri, day, size, files, keeper))

    for day, uri in day_folders(storage.join(out, "datasets")):
        consider("dataset", uri, day, rcfg.datasets_days)
    # The next run reads the validated days of its training window again: never delete those (a window longer
    # than validated_days would otherwise re-validate most of its days on every run).
    validated_days = max(rcfg.validated_days, cfg.airflow.train_days) if rcfg.validated_days else 0
    for day, uri in day_folders(storage.join(out, "validated")):
        consider("validated", uri, day, validated_days, skip=QUARANTINE)
        consider("quarantine", storage.join(uri, QUARANTINE), day, rcfg.quarantine_days)
    for day, uri in day_folders(storage.join(out, "models")):
        for _, data in subfolders(uri):
            for _, trial in subfolders(data):
                consider("model", trial, day, rcfg.models_days)
    root = scratch_root(out)
    if root is not None:
        for day, uri in day_folders(str(root)):
            for _, data in subfolders(uri):
                for _, trial in subfolders(data):
                    consider("scratch", trial, day, rcfg.scratch_days)
    return result


def apply(result: Plan) -> Plan:
    """Delete what the plan lists; for a validated partition everything but its quarantine folder."""
    for item in result.delete:
        if item.kind == "validated":
            for child in children_except(item.uri, QUARANTINE):
                storage.remove(child)
        else:
            storage.remove(item.uri)
        log.info("retention: deleted %s %s (%d files, %d bytes)", item.kind, item.uri, item.files, item.bytes)
        _remove_empty_parents(item.uri, result.output_uri)
    result.deleted = True
    return result


def _remove_empty_parents(uri: str, stop: str) -> None:
    """Local folders left empty (dt=D/<data>/ after their trials went); S3 has no folders to remove."""
    if storage.is_s3(uri):
        return
    path = Path(uri).parent
    limits = {Path(stop), *(p for p in [scratch_root(stop)] if p)}
    while path not in limits and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


def run(cfg: PipelineConfig, output_uri: str, today: dt.date, *, dry_run: bool) -> Plan:
    """Plan, log and (unless ``dry_run``) delete."""
    result = plan(cfg, output_uri, today)
    for item in result.kept:
        log.info("retention: keeping %s %s (old, but %s needs it)", item.kind, item.uri, item.protected_by)
    log.info(
        "retention on %s: %d folder(s), %d bytes %s under %s",
        result.today, len(result.delete), result.bytes, "would go" if dry_run else "to delete", result.output_uri,
    )  # fmt: skip
    return result if dry_run else apply(result)


def retention_task(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """The DAG's last task: retention relative to the run's data interval end (its date + 1 day).

    Relative to the run's date rather than the wall clock, so a re-run or a backfill of an old date
    deletes no more than the original run did.
    """
    cfg = config_of(run_info)
    today = dt.date.fromisoformat(run_info["date"]) + dt.timedelta(days=1)
    result = run(cfg, run_info["output_uri"], today, dry_run=False)
    return {
        "today": result.today,
        "deleted": len(result.delete),
        "bytes": result.bytes,
        "kept": len(result.kept),
    }


def format_table(result: Plan) -> str:
    """The plan as a terminal table: one line per folder, then the totals."""
    rows = [("kind", "day", "bytes", "files", "uri / kept for")]
    rows += [(i.kind, i.day, str(i.bytes), str(i.files), i.uri) for i in result.delete]
    rows += [
        (i.kind, i.day, str(i.bytes), str(i.files), f"{i.uri}  (kept: {i.protected_by})") for i in result.kept
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]).rstrip() for r in rows]
    verb = "deleted" if result.deleted else "would delete"
    lines.append(
        f"{verb} {len(result.delete)} folder(s), {result.bytes} bytes; kept {len(result.kept)} old folder(s) "
        f"for {', '.join(result.lineage) or 'no registered model'} (as of {result.today}, {result.output_uri})"
    )
    return "\n".join(lines)
