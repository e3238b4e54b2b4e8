"""Test data for the GRU4Rec tests: small synthetic click logs with a learnable pattern, tiny configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import GRU4RecConfig


def synthetic_table(n_sessions: int = 300, n_items: int = 40, seed: int = 0, max_len: int = 8) -> pa.Table:
    """Sessions walking a ring of items (next = current + 1 or + 2), in canonical event columns.

    Sessions are written in shuffled row order with overlapping start times, so readers must sort.
    """
    rng = np.random.default_rng(seed)
    sid, item, ts = [], [], []
    for s in range(n_sessions):
        length = int(rng.integers(2, max_len + 1))
        start = 1_600_000_000 + int(rng.integers(0, 100_000))
        cur = int(rng.integers(0, n_items))
        for k in range(length):
            sid.append(f"s{s}")
            item.append(f"i{cur}")
            ts.append((start + 30 * k) * 1_000_000)
            cur = (cur + int(rng.choice([1, 2], p=[0.8, 0.2]))) % n_items
    order = rng.permutation(len(sid))
    return pa.table(
        {
            "session_id": pa.array(np.array(sid)[order], pa.string()),
            "item_id": pa.array(np.array(item)[order], pa.string()),
            "timestamp": pa.array(np.array(ts)[order], pa.timestamp("us", tz="UTC")),
        }
    )


def write_tsv(table: pa.Table, path: Path) -> Path:
    """The same events as a GRU4Rec TSV file (SessionId, ItemId, Time in unix seconds)."""
    times = table.column("timestamp").cast(pa.int64()).to_numpy() / 1e6
    lines = ["SessionId\tItemId\tTime"]
    lines += [f"{s}\t{i}\t{t:.3f}" for s, i, t in zip(table.column("session_id").to_pylist(), table.column("item_id").to_pylist(), times, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(**changes) -> GRU4RecConfig:
    """A fast config: small GRU, few samples, no dropout unless asked."""
    base = dict(layers=(16,), batch_size=8, n_sample=16, n_epochs=2, learning_rate=0.1, momentum=0.1, dropout_p_hidden=0.0)
    return GRU4RecConfig(**(base | changes))
