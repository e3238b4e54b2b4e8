"""Matplotlib PNGs a person would rather look at than read: training curves and Recall@K / MRR@K curves.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never ``pyplot``: no global
figure state, no GUI backend, safe in worker threads and headless Airflow tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# One colour per series, stable across plots so "S-POP" looks the same everywhere.
_COLOURS = {"GRU4Rec": "#1f77b4", "S-POP": "#ff7f0e", "POP": "#7f7f7f"}


def cutoff_curves_from_ranks(ranks: Sequence[float] | np.ndarray, max_k: int = 20) -> dict[str, list[float]]:
    """Recall@K and MRR@K for K = 1..max_k from per-prediction ranks (1 = best)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return {"recall": [0.0] * max_k, "mrr": [0.0] * max_k}
    recall, mrr = [], []
    for k in range(1, max_k + 1):
        hit = r <= k
        recall.append(float(hit.mean()))
        mrr.append(float(np.where(hit, 1.0 / r, 0.0).mean()))
    return {"recall": recall, "mrr": mrr}


def training_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Loss per epoch (left) and validation metrics per epoch (right) from one dict of metrics per epoch.

    Keys containing ``loss`` go to the left panel; keys starting with ``valid`` to the right one.
    """
    from matplotlib.figure import Figure

    epochs = np.arange(1, len(history) + 1)
    keys = sorted({k for row in history for k in row})
    loss_keys = [k for k in keys if "loss" in k]
    valid_keys = [k for k in keys if k.startswith("valid") and "loss" not in k]
    panels = [("training loss", loss_keys)] + ([("validation", valid_keys)] if valid_keys else [])
    fig = Figure(figsize=(6 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, group) in zip(axes, panels, strict=True):
        for key in group:
            ax.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
        ax.set_title(title if group else f"{title} (not reported)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if group:
            ax.legend(fontsize="small")
    return _save(fig, path)


def cutoff_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Recall@K and MRR@K against K for the model and its baselines.

    ``curves`` maps a series name (``GRU4Rec``, ``POP``, ``S-POP``) to ``{"recall": [...], "mrr": [...]}``
    with one value per K starting at K = 1.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in ((axes[0], "recall", "Recall@K"), (axes[1], "mrr", "MRR@K")):
        for name, series in curves.items():
            values = list(series.get(metric, []))
            if not values:
                continue
            ks = np.arange(1, len(values) + 1)
            ax.plot(ks, values, marker=".", label=name, color=_COLOURS.get(name))
        ax.set_xlabel("K (length of the recommendation list)")
        ax.set_xticks([1, *range(5, max(len(v.get(metric, [])) for v in curves.values()) + 1, 5)])
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def champion_history(
    dates: Sequence[str],
    champion: Sequence[float | None],
    candidates: Sequence[tuple[str, float, str]],
    spop: Sequence[float | None],
    metric: str,
    path: str | Path,
) -> Path:
    """The primary metric over run dates: the champion after each decision (a step line), every candidate
    (challenger) as a marker by what was decided, and S-POP on the same test data.

    ``dates`` are ISO dates of the decisions in order; ``champion`` and ``spop`` one value (or None) per date;
    ``candidates`` ``(date, value, action)`` triples.
    """
    import datetime as dt

    from matplotlib.figure import Figure

    def day(value: str) -> dt.date:
        return dt.date.fromisoformat(value[:10])

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    xs = [day(d) for d in dates]
    held = [(x, v) for x, v in zip(xs, champion, strict=True) if v is not None]
    if held:
        ax.step(*zip(*held, strict=True), where="post", color=_COLOURS["GRU4Rec"], marker="o", label="@champion")
    markers = {"promoted": ("^", "#2ca02c"), "challenger": ("o", "#d62728"), "refused": ("x", "#7f7f7f")}
    for action in sorted({a for _, _, a in candidates}):
        shape, colour = markers.get(action, ("s", "#9467bd"))
        points = [(day(d), v) for d, v, a in candidates if a == action]
        ax.scatter(*zip(*points, strict=True), marker=shape, color=colour, zorder=3, label=f"candidate: {action}")
    base = [(x, v) for x, v in zip(xs, spop, strict=True) if v is not None]
    if base:
        ax.plot(*zip(*base, strict=True), linestyle="--", color=_COLOURS["S-POP"], label="S-POP (same test data)")
    if xs:  # one tick per day (or every few days), labelled as dates
        from matplotlib import dates as mdates

        span = (max(xs) - min(xs)).days
        ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, span // 8)))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.set_title(f"{metric} of the champion and its challengers by run date")
    ax.set_xlabel("run date")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.autofmt_xdate()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out
