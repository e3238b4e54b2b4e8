"""The status screen: its sections (where each was read from, its rows or why it could not be read) and
the terminal view, one titled, aligned table per section. pipeline.flow.status fills it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.data.partitions import duration_text


@dataclass
class Section:
    """One part of the screen: where it was read from, its rows, or why it could not be read."""

    source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Status:
    generated_at: str
    output_uri: str
    sections: dict[str, Section]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The terminal view


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> list[str]:
    """Rows as aligned text columns: (key, header, format) per column; numbers right-aligned."""
    cells = [[fmt(r.get(key)) for key, _, fmt in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [
        all(_is_number(r.get(k)) or r.get(k) is None for r in rows) and bool(rows) for k, _, _ in columns
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return [line(headers), *(line(c) for c in cells)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _secs(value: Any) -> str:
    return "-" if value is None else duration_text(float(value))


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.4f}"


def _window(value: Any) -> str:
    """'2026-11-29T00:00:16.36Z .. 2026-12-01T23:57:18.46Z' -> '2026-11-29 00:00 .. 2026-12-01 23:57'."""
    if not value:
        return "-"
    return " .. ".join(part.strip().replace("T", " ")[:16] for part in str(value).split(".."))


def _short(width: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        text = _cell(value)
        return text if len(text) <= width else text[: width - 1] + "…"

    return fmt


COLUMNS: dict[str, list[tuple[str, str, Callable[[Any], str]]]] = {
    "runs": [("date", "date", _cell), ("state", "state", _cell), ("run_type", "type", _cell),
             ("duration_s", "duration", _secs), ("start", "started", _cell), ("run_id", "run id", _short(40)),
             ("note", "note", _short(60))],
    "models": [("alias", "alias", _cell), ("version", "version", _cell), ("metric", "metric", _cell),
               ("value", "value", _cell), ("spop", "S-POP", _cell), ("vs_spop", "vs S-POP", _signed),
               ("pop", "POP", _cell), ("since", "since", _cell), ("trained_on", "trained on", _window)],
    "decisions": [("decided_at", "decided at", _cell), ("date", "date", _cell), ("action", "action", _cell),
                  ("candidate_version", "cand.", _cell), ("champion_version", "champ.", _cell),
                  ("mean_diff", "diff", _signed), ("p_value", "p", _cell), ("actor", "by", _short(30)),
                  ("reason", "reason", _short(70))],
    "days": [("date", "date", _cell), ("rows_in", "rows in", _cell), ("rows_valid", "valid", _cell),
             ("rows_quarantined", "quarantined", _cell), ("share", "share", _pct), ("success", "passed", _cell),
             ("top_reason", "top reason", _cell)],
    "waits": [("date", "date", _cell), ("state", "state", _cell), ("waited_s", "waited", _secs),
              ("waited_for", "waited for", _cell), ("since", "since", _cell)],
    "usage": [("folder", "folder", _cell), ("bytes", "size", _bytes), ("files", "files", _cell), ("uri", "uri", _cell)],
}  # fmt: skip

TITLES = {
    "runs": "DAG runs",
    "models": "models",
    "decisions": "decisions",
    "days": "validation per day",
    "waits": "partitions waited for",
    "usage": "output usage",
}


def format_status(status: Status) -> str:
    """The terminal view: one titled, aligned table per section; an unreadable source says why."""
    out = [f"pipeline status at {status.generated_at}  (outputs: {status.output_uri})"]
    for name, section in status.sections.items():
        out += ["", f"== {TITLES[name]}  [{section.source}]"]
        if section.error:
            out.append(f"   UNAVAILABLE: {section.error}")
        elif not section.rows:
            out.append("   (none)")
        else:
            rows = section.rows
            if name == "models":
                present = [r for r in rows if r.get("version")]
                out += [f"   no @{r['alias']}" for r in rows if not r.get("version")]
                rows = present
                if not rows:
                    continue
            out += ["   " + line for line in table(rows, COLUMNS[name])]
    return "\n".join(out)
