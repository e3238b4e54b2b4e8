"""pipeline.data.sessions: ordering, filtering, temporal split, item index, atomic and reproducible datasets."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.config import BuildConfig
from pipeline.data import sessions
from pipeline.data.schema import ITEMS_SCHEMA, SPLIT_SCHEMA
from pipeline.errors import InputError

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
OFF = BuildConfig(test_days=0, valid_days=0, min_session_length=0, min_item_support=0)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def rows_of(table: pa.Table) -> list[tuple]:
    return list(zip(table.column("session_id").to_pylist(), table.column("item_id").to_pylist(), strict=True))


def test_gru4rec_order_session_start_then_id_then_time(events) -> None:
    table = events(
        [
            ("b", "x", at(5)), ("a", "y", at(9)), ("b", "z", at(1)),   # b starts at 1, a at 3
            ("a", "w", at(3)), ("c", "v", at(1)), ("c", "u", at(1)),   # c ties b's start: id order b < c;
        ]                                                               # c's equal times keep input order
    )  # fmt: skip
    train = sessions.build_splits(table, OFF).train
    assert rows_of(train) == [("b", "z"), ("b", "x"), ("c", "v"), ("c", "u"), ("a", "w"), ("a", "y")]
    assert train.schema == SPLIT_SCHEMA


def test_iterative_filtering_runs_until_stable(events) -> None:
    rows = [("s1", "rare", at(0)), ("s1", "pop", at(1))]  # s1 loses "rare", then is too short
    rows += [(f"s{k}", "pop", at(k)) for k in range(2, 6)] + [(f"s{k}", "hit", at(k + 0.5)) for k in range(2, 6)]
    result = sessions.build_splits(events(rows), BuildConfig(test_days=0, valid_days=0, min_session_length=2, min_item_support=2))
    assert "s1" not in result.train.column("session_id").to_pylist()
    assert result.stats["dropped"] == {
        "repeats": 0, "short_sessions": 1, "rare_items": 1, "valid_unknown_items": 0,
        "valid_short_sessions": 0, "test_unknown_items": 0, "test_short_sessions": 0,
    }  # fmt: skip
    assert result.stats["filter_iterations"] == 3  # pass 2 removes what pass 1 exposed; pass 3 finds it stable


def test_consecutive_repeats_are_an_option(events) -> None:
    table = events([("s", "a", at(0)), ("s", "a", at(1)), ("s", "b", at(2)), ("s", "a", at(3))])
    assert rows_of(sessions.build_splits(table, OFF).train) == [("s", "a")] * 2 + [("s", "b"), ("s", "a")]
    dropped = sessions.build_splits(table, BuildConfig(test_days=0, valid_days=0, min_session_length=0, min_item_support=0, drop_repeats=True))
    assert rows_of(dropped.train) == [("s", "a"), ("s", "b"), ("s", "a")]


def test_temporal_split_train_items_and_min_length(events) -> None:
    day = 24 * 60
    rows = [(f"tr{k}", f"i{k % 3}", at(k)) for k in range(6)] + [(f"tr{k}", f"i{(k + 1) % 3}", at(k + 1)) for k in range(6)]
    rows += [("va", "i0", at(2 * day - 30)), ("va", "i1", at(2 * day - 20))]  # ends within 1 day of train's end
    rows += [("te", "i2", at(3 * day)), ("te", "new", at(3 * day + 1)), ("te", "i0", at(3 * day + 2))]
    rows += [("te2", "new", at(3 * day + 5)), ("te2", "i1", at(3 * day + 6))]  # 1 known item left: dropped
    rows += [("edge", "i1", at(2 * day + 6)), ("edge", "i2", at(2 * day + 6))]  # ends exactly at tmax - 1 day
    result = sessions.build_splits(events(rows), BuildConfig(test_days=1, valid_days=1, min_session_length=0, min_item_support=0))
    assert set(result.test.column("session_id").to_pylist()) == {"te", "edge"}  # inside the window, edge included
    assert rows_of(result.test)[-2:] == [("te", "i2"), ("te", "i0")]  # the unknown item is gone, not the session
    assert set(result.valid.column("session_id").to_pylist()) == {"va"}
    assert set(result.train.column("session_id").to_pylist()) == {f"tr{k}" for k in range(6)}
    assert result.stats["dropped"]["test_unknown_items"] == 2 and result.stats["dropped"]["test_short_sessions"] == 1
    # Item index: train only, dense, in order of first appearance; counts are train popularity.
    items = result.items
    assert items.schema == ITEMS_SCHEMA
    assert items.column("item_id").to_pylist() == ["i0", "i1", "i2"]
    assert items.column("count").to_pylist() == [4, 4, 4]
    lookup = dict(zip(items.column("item_id").to_pylist(), items.column("item_idx").to_pylist(), strict=True))
    for split in (result.train, result.valid, result.test):
        assert split.column("item_idx").to_pylist() == [lookup[i] for i in split.column("item_id").to_pylist()]


def test_zero_days_means_no_split_and_empty_train_is_an_error(events) -> None:
    table = events([("a", "x", at(0)), ("a", "y", at(1))])
    result = sessions.build_splits(table, OFF)
    assert result.valid.num_rows == 0 and result.test.num_rows == 0 and result.train.num_rows == 2
    with pytest.raises(InputError, match="train split is empty"):
        sessions.build_splits(table, BuildConfig(test_days=1, valid_days=0, min_session_length=0, min_item_support=0))
    with pytest.raises(InputError, match="null session_id"):
        sessions.build_splits(events([(None, "x", at(0))]), OFF)


def test_dataset_is_atomic_reproducible_and_readable(tmp_path: Path, write_partition, good_day, tree_digest) -> None:
    days = [dt.date(2024, 3, d) for d in (10, 11, 12)]
    raw = tmp_path / "clicks"
    for d in days:
        write_partition(good_day(d, prefix=f"d{d.day}-"), d, root=raw)
    out = tmp_path / "ds"
    config = BuildConfig(test_days=1, valid_days=1, min_session_length=2, min_item_support=1)
    first = sessions.build_dataset([str(raw)], str(out), build=config)
    digest = tree_digest(out)
    second = sessions.build_dataset([str(raw)], str(out), build=config)
    again = tree_digest(out)
    assert {k: v for k, v in again.items() if k != "manifest.json"} == {
        k: v for k, v in digest.items() if k != "manifest.json"
    }  # byte-identical data files
    assert first["fingerprint"] == second["fingerprint"] and first["schema_version"] == 1
    assert first["counts"]["test"]["events"] > 0 and first["counts"]["valid"]["events"] > 0
    # Readable as plain Parquet datasets, with the documented columns.
    assert pads.dataset(str(out / "train")).schema.names == ["session_id", "item_id", "timestamp", "item_idx"]
    assert sessions.read_split(str(out), "items").num_rows == first["files"]["items"]["rows"]
    # A build that fails half-way leaves the committed dataset as it was and no temporary folder.
    with pytest.raises(InputError):
        sessions.build_dataset([str(raw)], str(out), build=BuildConfig(test_days=5, valid_days=0))
    assert tree_digest(out) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clicks", "ds"]
    with pytest.raises(InputError, match="no manifest.json"):
        sessions.read_split(str(tmp_path / "clicks"), "train")
    # A manifest from another tool (no file list) is an error that names the file, not a KeyError.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match=r"manifest.json lists no file for split 'train'"):
        sessions.read_split(str(foreign), "train")


def test_yoochoose_union_split_back_into_its_parts(yoochoose, tmp_path: Path) -> None:
    """Filtering off, 1-day window: train and test equal train_tr.tsv and train_valid.tsv row for row."""
    manifest = sessions.build_dataset(
        [str(yoochoose["train"]), str(yoochoose["valid"])],
        str(tmp_path / "ds"),
        build=BuildConfig(test_days=1, valid_days=0, min_session_length=0, min_item_support=0),
    )
    assert manifest["counts"]["train"]["events"] == 53254 and manifest["counts"]["test"]["events"] == 16539
    for split, source in (("train", yoochoose["train"]), ("test", yoochoose["valid"])):
        got = sessions.read_split(str(tmp_path / "ds"), split).to_pandas()
        want = pd.read_csv(source, sep="\t", dtype={"SessionId": str, "ItemId": str, "Time": float})
        want["us"] = np.round(want.Time * 1e6).astype("int64")
        # Same multiset of rows...
        key = lambda s, i, t: sorted(zip(s, i, t, strict=True))  # noqa: E731
        assert key(got.session_id, got.item_id, got.timestamp.astype("int64")) == key(want.SessionId, want.ItemId, want.us)
        # ...in GRU4Rec order: by session start, session id, time (input order for ties).
        want["start"] = want.groupby("SessionId").us.transform("min")
        want = want.assign(pos=np.arange(len(want))).sort_values(["start", "SessionId", "us", "pos"])
        assert got.session_id.tolist() == want.SessionId.tolist()
        assert got.item_id.tolist() == want.ItemId.tolist()
        assert got.timestamp.astype("int64").tolist() == want.us.tolist()


# ---------------------------------------------------------------------------------------------
# Bounded memory: a build over budget works a bucket of sessions at a time, spilled to disk, same bytes


@pytest.fixture
def tiny_buckets(monkeypatch: pytest.MonkeyPatch) -> BuildConfig:
    """A 1 MB budget with each event counted as 56 KB: buckets of ~18 events, everything spilled to disk."""
    monkeypatch.setattr(sessions, "BYTES_PER_ROW", 56 * 1000)
    return BuildConfig(memory_budget_mb=1)


def _bucketed(config: BuildConfig, tiny: BuildConfig) -> BuildConfig:
    return BuildConfig(**{**config.__dict__, "memory_budget_mb": tiny.memory_budget_mb})


def test_session_moved_by_filtering_crosses_buckets(events, tiny_buckets: BuildConfig, caplog) -> None:
    # "a" starts first, but its first event is a rare item: without it, "a" starts after every "b<k>".
    rows = [("a", "rare", at(0)), ("a", "x", at(50)), ("a", "y", at(51))]
    rows += [(f"b{k:02d}", item, at(1 + k + j / 10)) for k in range(30) for j, item in enumerate(("x", "y"))]
    config = BuildConfig(test_days=0, valid_days=0, min_session_length=2, min_item_support=2)
    expected = [f"b{k:02d}" for k in range(30) for _ in range(2)] + ["a", "a"]
    in_memory = sessions.build_splits(events(rows), config)
    with caplog.at_level("INFO", logger="pipeline.data.sessions"):
        bucketed = sessions.build_splits(events(rows), _bucketed(config, tiny_buckets))
    assert "buckets" in caplog.text and "spilled" in caplog.text  # it really ran in several buckets, on disk
    assert in_memory.train.column("session_id").to_pylist() == expected
    assert bucketed.train.equals(in_memory.train) and bucketed.items.equals(in_memory.items)
    assert bucketed.stats == in_memory.stats


def test_bucketed_build_writes_the_same_bytes(
    tmp_path: Path, write_partition, good_day, tree_digest, tiny_buckets: BuildConfig
) -> None:
    """Sessions spanning files, repeats, out-of-order times, filtering: same files whatever the budget."""
    raw = tmp_path / "clicks"
    for d in (10, 11, 12):
        day = dt.date(2024, 3, d)
        rows = good_day(day, prefix=f"d{d}-")
        if d < 12:  # one session across the first two files, each event repeated
            rows += [("night", f"i{d % 3}", dt.datetime(2024, 3, d, 23, 59, tzinfo=dt.UTC))] * 2
        write_partition(rows[::-1] if d == 11 else rows, day, root=raw)  # one file out of time order
    config = BuildConfig(test_days=1, valid_days=1, min_session_length=2, min_item_support=3, drop_repeats=True)
    plain = sessions.build_dataset([str(raw)], str(tmp_path / "plain"), build=config)
    bucketed = sessions.build_dataset([str(raw)], str(tmp_path / "bucketed"), build=_bucketed(config, tiny_buckets))
    assert plain["files"] == bucketed["files"] and plain["counts"] == bucketed["counts"]
    digest = tree_digest(tmp_path / "plain")
    assert {k: v for k, v in tree_digest(tmp_path / "bucketed").items() if k != "manifest.json"} == {
        k: v for k, v in digest.items() if k != "manifest.json"
    }
    assert plain["counts"]["dropped"]["repeats"] > 0 and plain["counts"]["test"]["events"] > 0
    night = [r for split in ("train", "valid", "test") for r in rows_of(sessions.read_split(str(tmp_path / "plain"), split))]
    assert [r for r in night if r[0] == "night"] == [("night", "i1"), ("night", "i2")]  # one session, repeats gone
    # Data files are named by their content, and the manifest lists exactly the files there are.
    for entry in plain["files"].values():
        assert entry["path"].endswith(f"-{entry['sha256'][:16]}.parquet")
    assert sorted(k for k in digest if k != "manifest.json") == sorted(e["path"] for e in plain["files"].values())


def test_yoochoose_bucketed_equals_in_memory(yoochoose, tmp_path: Path, tiny_buckets: BuildConfig, tree_digest) -> None:
    inputs = [str(yoochoose["train"]), str(yoochoose["valid"])]
    config = BuildConfig(test_days=1, valid_days=1, min_session_length=2, min_item_support=5)
    sessions.build_dataset(inputs, str(tmp_path / "plain"), build=config)
    sessions.build_dataset(inputs, str(tmp_path / "bucketed"), build=BuildConfig(**{**config.__dict__, "memory_budget_mb": 400}))  # ~10 buckets
    without_manifest = lambda p: {k: v for k, v in tree_digest(p).items() if k != "manifest.json"}  # noqa: E731
    assert without_manifest(tmp_path / "plain") == without_manifest(tmp_path / "bucketed")


def test_array_store_spills_over_budget_and_cleans_up(tmp_path: Path) -> None:
    from pipeline.data.spill import ArrayStore

    a, b = np.arange(100, dtype=np.int64), np.arange(50, dtype=np.int32)
    with ArrayStore(budget_bytes=1000, directory=str(tmp_path)) as store:
        store.put("small", x=b)
        assert not store.spilled and not any(tmp_path.iterdir())
        store.put("big", x=a, y=b)  # 1000 bytes in all: over budget, everything goes to disk
        assert store.spilled and len(list(tmp_path.rglob("*.npy"))) == 3
        assert np.array_equal(store.get("big")["y"], b) and np.array_equal(store.pop("small")["x"], b)
        assert store.pop("small") is None and len(list(tmp_path.rglob("*.npy"))) == 2
    assert not any(tmp_path.iterdir())  # the spill folder is gone


def test_user_only_log_is_sessionized_across_files(tmp_path: Path) -> None:
    """A log of users without session ids: sessions are derived over all files at once, so one that
    crosses from one file into the next stays one session (the build's one-file-at-a-time path steps aside)."""
    import pyarrow.parquet as pq

    def write(name: str, rows: list[tuple[str, str, dt.datetime]]) -> None:
        users, items, times = zip(*rows, strict=True)
        table = pa.table({"user_id": users, "item_id": items, "timestamp": pa.array(times, pa.timestamp("us", tz="UTC"))})
        pq.write_table(table, tmp_path / name)

    start = dt.datetime(2024, 1, 1, 23, 50, tzinfo=dt.UTC)
    write("a.parquet", [("u1", "x", start), ("u1", "y", start + dt.timedelta(minutes=5)), ("u2", "x", start)])
    write("b.parquet", [("u1", "z", start + dt.timedelta(minutes=15)), ("u2", "y", start + dt.timedelta(minutes=1))])
    manifest = sessions.build_dataset([str(tmp_path)], str(tmp_path.parent / "ds"), build=OFF)
    train = sessions.read_split(str(tmp_path.parent / "ds"), "train")
    assert manifest["counts"]["train"]["sessions"] == 2
    assert rows_of(train) == [("u1@1704153000000000", i) for i in "xyz"] + [("u2@1704153000000000", i) for i in "xy"]
