"""The validation's whole-session rules, applied by the build over its whole window.

Validation sees one partition at a time, so a session crossing midnight is only whole in the build: rows
breaking a rule there are quarantined (``quarantine/`` of the dataset, with their rules as ``reason``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.expectations import seconds_before_session_max
from pipeline.data.schema import SPLIT_SCHEMA, TIMESTAMP_TYPE


@dataclass
class SessionRules:
    """Which of the rules the build applies (from the validated inputs' settings, see :meth:`tighten`)."""

    max_session_length: int | None = None  # sessions with more events are quarantined whole; None: off
    check_order: bool = False  # an event earlier than an earlier event (input order) of its session is quarantined

    @property
    def active(self) -> bool:
        return self.max_session_length is not None or self.check_order

    def tighten(self, validation: dict[str, Any]) -> None:
        """Take on the settings of one validated input (its report's ``config.validation``): the strictest of
        the inputs' lengths; the order rule unless a validation turned it off."""
        if "max_session_length" in validation:
            limit = int(validation["max_session_length"])
            self.max_session_length = min(limit, self.max_session_length or limit)
        self.check_order = self.check_order or validation.get("check_session_order") is not False


# Their names (as in the validation suite), in the order a row's reasons are joined.
SESSION_RULES = ("session_order", "session_length")
QUARANTINE_COLUMNS = pa.schema(list(SPLIT_SCHEMA)[:3] + [pa.field("reason", pa.string(), nullable=False)])


def rule_bits(
    rules: SessionRules, multi_part: np.ndarray, r: np.ndarray, t: np.ndarray, too_long: np.ndarray | None,
    in_time_order: bool,
) -> np.ndarray:
    """Per row (input order), a bit per broken rule of :data:`SESSION_RULES`. ``r``: each row's session rank,
    ``multi_part``: per rank, whether the session's events are in several input files; ``too_long``: per rank,
    whether the session has more events than allowed (None: that rule is off)."""
    why = np.zeros(len(r), dtype=np.int8)
    if rules.check_order and not in_time_order:
        # Rules come with validated inputs, whose files were each checked for order: only a session in
        # several files can be out of order as a whole (its rows are taken in input order).
        rows = np.flatnonzero(multi_part[r])
        behind = seconds_before_session_max(r[rows], t[rows], np.ones(len(rows), dtype=bool))
        why[rows] |= (behind > 0).astype(np.int8)
    if too_long is not None:
        why |= too_long[r].astype(np.int8) << 1
    return why


def rule_counts(why: np.ndarray) -> dict[str, int]:
    """Rows breaking each rule (a row breaking both counts for both)."""
    return {rule: int(((why >> k) & 1).sum()) for k, rule in enumerate(SESSION_RULES)}


def quarantine_table(session_ids: pa.Array, item_ids: pa.Array, t: np.ndarray, why: np.ndarray) -> pa.Table:
    """The quarantined rows with their broken rules joined by ``;`` as ``reason``."""
    labels = [";".join(rule for k, rule in enumerate(SESSION_RULES) if code >> k & 1) for code in range(4)]
    return pa.table(
        [
            session_ids,
            item_ids,
            pa.array(t).cast(TIMESTAMP_TYPE),
            pa.array(labels, pa.string()).take(pa.array(why.astype(np.int64))),
        ],
        schema=QUARANTINE_COLUMNS,
    )
