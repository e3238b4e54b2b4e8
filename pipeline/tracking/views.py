"""Read-only views of the model lifecycle for operators: the decision history and the registered versions.

Both read what :mod:`pipeline.tracking.records` and :mod:`pipeline.tracking.registry` write (decision runs with
``pipeline.kind = promotion``, tags on model versions and on the registered model); neither downloads artifacts, so they stay fast on a long
history. ``python -m pipeline promote --history`` and ``python -m pipeline models`` print them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from pipeline.errors import ConfigError
from pipeline.tracking import registry
from pipeline.tracking.decision import SELECTED_ON_OPERATOR, TimeWindow, parse_metric
from pipeline.tracking.runs import configure, quote

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from pipeline.config import PipelineConfig


# ---------------------------------------------------------------------------------------------
# Decision history


@dataclass(frozen=True)
class HistoryEntry:
    """One recorded decision or operator action, as ``promote --history`` lists it."""

    decided_at: str  # UTC, when the record was written
    date: str | None  # the DAG run's date, when a DAG run decided
    action: str
    candidate_version: str | None
    champion_version: str | None  # the champion before the decision
    metric: str
    mean_diff: float | None  # candidate - champion on the candidate's test split
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None  # Holm-corrected, when trials were selected on test
    selected_on: str
    n_trials: int | None
    actor: str
    reason: str
    record_run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def history(cfg: PipelineConfig, limit: int | None = 20) -> list[HistoryEntry]:
    """Every decision recorded for the registered model, newest first (``limit`` of them; None = all)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    client = registry.mlflow_client(cfg)
    experiment_id = configure(cfg.tracking)
    query = registry.decisions_query(cfg.tracking.registered_model)
    entries: list[HistoryEntry] = []
    token = None
    while limit is None or len(entries) < limit:
        page_size = 1000 if limit is None else min(1000, limit - len(entries))
        page = client.search_runs(
            [experiment_id],
            query,
            order_by=["attributes.start_time DESC"],
            max_results=page_size,
            page_token=token,
        )
        entries.extend(_entry(run) for run in page)
        token = page.token
        if not token:
            break
    return entries


def _entry(run: Run) -> HistoryEntry:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    n_trials = params.get("n_trials")
    return HistoryEntry(
        decided_at=_utc(run.info.start_time),
        date=tags.get(registry.TAG_DATE),
        action=tags.get(registry.TAG_DECISION, "?"),
        candidate_version=params.get("candidate_version") or None,
        champion_version=params.get("champion_version") or None,
        metric=params.get("metric", ""),
        mean_diff=metrics.get("mean_diff"),
        ci_low=metrics.get("ci_low"),
        ci_high=metrics.get("ci_high"),
        p_value=metrics.get("p_value"),
        p_adjusted=metrics.get("p_adjusted"),
        selected_on=tags.get(registry.TAG_SELECTED_ON) or params.get("selected_on", "not recorded"),
        n_trials=int(n_trials) if n_trials and n_trials.isdigit() else None,
        actor=tags.get(registry.TAG_ACTOR, "not recorded"),
        reason=tags.get(registry.TAG_REASON, ""),
        record_run_id=run.info.run_id,
    )


def _utc(ms: int | None) -> str:
    if not ms:
        return "?"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(value: float | None, fmt: str = "+.4f") -> str:
    return "-" if value is None else format(value, fmt)


def format_history(entries: list[HistoryEntry]) -> str:
    """Two lines per decision: what happened with the evidence, then who and why."""
    if not entries:
        return "no decisions recorded"
    lines = []
    for e in entries:
        champion = f"champion v{e.champion_version}" if e.champion_version else "no champion"
        if e.action in ("moved", "rolled_back"):
            versions = f"@champion v{e.champion_version or '-'} -> v{e.candidate_version or '-'}"
        elif e.selected_on == SELECTED_ON_OPERATOR:  # pin, unpin, or a lever that changed nothing
            versions = f"@champion v{e.champion_version or '-'}"
        else:
            versions = f"candidate v{e.candidate_version or '-'} vs {champion}"
        if e.mean_diff is not None:
            evidence = f"{e.metric} diff {_num(e.mean_diff)} (95% CI [{_num(e.ci_low)}, {_num(e.ci_high)}]) p={_num(e.p_value, '.4f')}"
            if e.p_adjusted is not None:
                evidence += f" (Holm {_num(e.p_adjusted, '.4f')})"
        else:
            evidence = "no paired test"
        trials = f", {e.n_trials} trial(s)" if e.n_trials else ""
        lines.append(
            f"{e.decided_at}  date {e.date or '-'}  {e.action:<11} {versions}  {evidence}  "
            f"selected_on={e.selected_on}{trials}"
        )
        lines.append(f"    by {e.actor}: {e.reason}  [record run {e.record_run_id}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Registered versions


@dataclass(frozen=True)
class VersionView:
    """A registered version as ``models`` lists it."""

    version: str
    aliases: list[str]
    run_id: str | None
    training_window: TimeWindow | None  # train + valid data it has seen
    test_window: TimeWindow | None
    metric: str
    value: float | None  # the primary metric on its own test split
    spop_value: float | None  # S-POP on the same split
    pop_value: float | None
    decision: str  # the decision that registered it
    decision_reason: str
    decision_record: str | None
    operator_action: str | None  # the last lever that moved @champion to it, with who and why
    operator_actor: str | None
    operator_reason: str | None
    rolled_back: bool


@dataclass(frozen=True)
class ModelsView:
    name: str
    pinned: registry.Pin | None
    versions: list[VersionView]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def models(cfg: PipelineConfig) -> ModelsView:
    """Every version of the registered model, newest first, with aliases, windows, metrics and origin."""
    client = registry.mlflow_client(cfg)
    tcfg = cfg.tracking
    name = tcfg.registered_model
    metric = parse_metric(tcfg.primary_metric).name
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}:
            return ModelsView(name, None, [])
        raise
    by_version: dict[str, list[str]] = {}
    for alias, version in (aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    versions = _all_versions(client, name)
    views = [_version_view(v, sorted(by_version.get(str(v.version), [])), metric) for v in versions]
    views.sort(key=lambda v: int(v.version), reverse=True)
    return ModelsView(name, registry.pin_state(client, name), views)


def _all_versions(client: MlflowClient, name: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = {quote(name)}", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _version_view(v: Any, aliases: list[str], metric: str) -> VersionView:
    tags = v.tags or {}
    train = (tags.get(registry.TAG_TRAIN_START), tags.get(registry.TAG_TRAIN_END))
    test = (tags.get(registry.TAG_TEST_START), tags.get(registry.TAG_TEST_END))
    return VersionView(
        version=str(v.version),
        aliases=aliases,
        run_id=v.run_id,
        training_window=TimeWindow(*train) if all(train) else None,  # type: ignore[arg-type]
        test_window=TimeWindow(*test) if all(test) else None,  # type: ignore[arg-type]
        metric=metric,
        value=_float(tags.get(f"metric.{metric}")),
        spop_value=_float(tags.get(f"metric.baseline_spop_{metric}")),
        pop_value=_float(tags.get(f"metric.baseline_pop_{metric}")),
        decision=tags.get(registry.TAG_DECISION, "not recorded"),
        decision_reason=tags.get(registry.TAG_REASON, ""),
        decision_record=tags.get(registry.TAG_RECORD_RUN),
        operator_action=tags.get(registry.TAG_OPERATOR_ACTION),
        operator_actor=tags.get(registry.TAG_OPERATOR_ACTOR),
        operator_reason=tags.get(registry.TAG_OPERATOR_REASON),
        rolled_back=tags.get(registry.TAG_ROLLED_BACK) == "true",
    )


def format_models(view: ModelsView) -> str:
    if not view.versions:
        return f"registered model {view.name!r} has no versions"
    lines = [f"registered model {view.name}"]
    if view.pinned is not None:
        p = view.pinned
        lines.append(f"@champion PINNED at v{p.version} by {p.actor} since {p.at}: {p.reason}")
    for v in view.versions:
        aliases = " ".join(f"@{a}" for a in v.aliases) or "-"
        window = str(v.training_window) if v.training_window else "not recorded"
        lines.append(
            f"v{v.version:<4} {aliases:<22} trained on {window}  {v.metric} {_num(v.value, '.4f')} "
            f"(S-POP {_num(v.spop_value, '.4f')}, POP {_num(v.pop_value, '.4f')})"
            + ("  [rolled back]" if v.rolled_back else "")
        )
        lines.append(f"    created by decision {v.decision}: {v.decision_reason}")
        if v.operator_action:
            lines.append(
                f"    last operator action {v.operator_action} by {v.operator_actor}: {v.operator_reason}"
            )
    return "\n".join(lines)
