"""Metric names: the one scheme for the two spellings of a ranking metric.

``evaluate`` writes the papers' spelling, ``recall@20`` / ``mrr@20`` (its JSON and printed table); MLflow keys,
the config (``tracking.primary_metric``) and promotion records use ``recall_at_20`` / ``mrr_at_20`` (stable,
search-friendly keys). Every conversion between them goes through this module; neither spelling changes.

No pipeline imports: any layer may use it.
"""

from __future__ import annotations

import re

KINDS = ("recall", "mrr")  # the full-ranking metrics evaluate computes at each cutoff
BASELINES = ("pop", "spop")  # the baselines logged beside them (``baseline_spop_mrr_at_20``)

_PARSE = re.compile(r"\s*(mrr|recall)\s*(?:@|_at_)\s*(\d+)\s*", flags=re.IGNORECASE)
_RANKING_KEY = re.compile(rf"(baseline_({'|'.join(BASELINES)})_)?({'|'.join(KINDS)})_at_\d+")
_ODD = re.compile(r"[^A-Za-z0-9_./ -]+")


def at_name(kind: str, cutoff: int) -> str:
    """Evaluate's spelling: ``at_name("mrr", 20) == "mrr@20"``."""
    return f"{kind}@{cutoff}"


def key(kind: str, cutoff: int) -> str:
    """The MLflow / config spelling: ``key("mrr", 20) == "mrr_at_20"``."""
    return f"{kind}_at_{cutoff}"


def is_at_name(name: str) -> bool:
    """True for a metric in evaluate's spelling (``recall@20``), false for counts and settings."""
    return "@" in name


def to_key(name: str) -> str:
    """A stable MLflow metric key: ``recall@20`` -> ``recall_at_20``; other odd characters become ``_``."""
    return _ODD.sub("_", name.strip().replace("@", "_at_"))


def parse(name: str) -> tuple[str, int] | None:
    """(kind, cutoff) of ``mrr_at_20``, ``mrr@20``, ``MRR@20``, ``recall_at_10`` ...; None for anything else."""
    m = _PARSE.fullmatch(name)
    if not m or int(m.group(2)) < 1:
        return None
    return m.group(1).lower(), int(m.group(2))


def twin(name: str, kind: str) -> str:
    """The ``kind`` metric at the same cutoff, in the same spelling: ``twin("mrr_at_20", "recall") == "recall_at_20"``;
    ``name`` unchanged when it is not a ranking metric."""
    parsed = parse(name)
    if parsed is None:
        return name
    return at_name(kind, parsed[1]) if is_at_name(name) else key(kind, parsed[1])


def is_ranking_key(name: str) -> bool:
    """True for a test metric a person compares: ``recall_at_K``, ``mrr_at_K`` and the baselines' (not per-epoch
    ``valid_*`` or throughput metrics)."""
    return _RANKING_KEY.fullmatch(name) is not None
