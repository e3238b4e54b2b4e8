"""The demo's import of one log file into daily Parquet partitions (pipeline.flow.demo_data.import_by_day): what the
source format implies travels in the Parquet metadata, and malformed lines are set aside, not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import IngestConfig, ValidationConfig
from pipeline.data.validate import validate
from pipeline.flow import demo_data

# Diginetica: a session's views in no particular time order (timeframe = ms since the session started),
# and one line cut short by a crashed writer.
DIGINETICA = """session_id;user_id;item_id;timeframe;eventdate
1;NA;81766;526309;2016-05-09
1;NA;31331;1031018;2016-05-09
1;NA;32118;243569;2016-05-09
2;NA;12;5000;2016-05-09
2;NA;13;1000;2016-05-09
3;NA;14
3;NA;15;1000;2016-05-10
3;NA;16;2000;2016-05-10
"""
GRU4REC = (
    "SessionId\tItemId\tTime\n1\t10\t1462752000\n1\t11\t1462752060\n2\t10\t1462838400\n2\t12\t1462838460\n"
)


def test_diginetica_keeps_its_unordered_rows_valid_after_the_import(tmp_path: Path) -> None:
    source = tmp_path / "train-item-views.csv"
    source.write_text(DIGINETICA)
    out = tmp_path / "imported"
    said: list[str] = []

    assert demo_data.import_by_day(str(source), out, said.append) == str(out)

    assert sorted(p.name for p in out.glob("dt=*")) == ["dt=2016-05-09", "dt=2016-05-10"]
    metadata = pq.read_schema(out / "dt=2016-05-09" / "events.parquet").metadata
    assert (metadata[b"pipeline.format"], metadata[b"pipeline.ordered"]) == (b"diginetica", b"false")
    rejected = pq.read_table(out / "_rejected.parquet").to_pylist()
    assert [(r["file"], r["line"], r["raw"]) for r in rejected] == [(str(source), 7, "3;NA;14")]
    assert any("1 malformed line(s) set aside" in line for line in said)
    marker = json.loads((out / "_imported.json").read_text())
    assert (marker["rows"], marker["rejected_lines"]) == ({"2016-05-09": 5, "2016-05-10": 2}, 1)
    # Validation reads the imported partition as Diginetica: no session-order rule, nothing quarantined.
    report = validate(
        [str(out / "dt=2016-05-09")], str(tmp_path / "validated"), IngestConfig(), ValidationConfig()
    )
    assert report["success"] and report["rows_quarantined"] == 0
    assert "session_order" not in {e["rule"] for e in report["expectations"]}
    # A second import of the same file reuses the partitions.
    demo_data.import_by_day(str(source), out, said.append)
    assert said[-1].startswith(f"  reusing {out}")


def test_an_ordered_format_is_marked_ordered(tmp_path: Path) -> None:
    source = tmp_path / "clicks.tsv"
    source.write_text(GRU4REC)
    out = tmp_path / "imported"
    demo_data.import_by_day(str(source), out, lambda _: None)
    metadata = pq.read_schema(out / "dt=2016-05-09" / "events.parquet").metadata
    assert (metadata[b"pipeline.format"], metadata[b"pipeline.ordered"]) == (b"gru4rec", b"true")
    assert not (out / "_rejected.parquet").exists()
