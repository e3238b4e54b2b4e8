"""Full-ranking evaluation: ties, fresh state per session, unknown items, baselines, inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from gru4rec_testdata import synthetic_table, tiny_config, write_tsv

from pipeline.errors import ConfigError, InputError
from pipeline.model.clicks import ItemMap, build_item_map, index_sessions, read_log
from pipeline.model.evaluate import evaluate, evaluate_model, metrics_from_ranks
from pipeline.model.network import GRU4Rec
from pipeline.model.train import train


def _events(rows: list[tuple[str, str, int]]) -> pa.Table:
    s, i, t = zip(*rows, strict=True)
    return pa.table({"session_id": list(s), "item_id": list(i), "timestamp": pa.array([x * 1_000_000 for x in t], pa.timestamp("us", tz="UTC"))})


def _model_and_map(n_items: int = 30, seed: int = 0) -> tuple[GRU4Rec, ItemMap]:
    torch.manual_seed(seed)
    model = GRU4Rec(n_items, (8,)).eval()
    with torch.no_grad():
        model.By.uniform_(-0.5, 0.5)
    return model, ItemMap.from_ids([f"i{k}" for k in range(n_items)], np.arange(n_items) + 1)


def _naive_ranks(model, item_map, table, ties):
    """Each test session on its own, from a zero state, ranking every training item with plain loops."""
    log = read_log(table)
    ranks = {}
    for s in range(log.n_sessions):
        lo, hi = log.offsets[s], log.offsets[s + 1]
        items = item_map.index(log.item_ids[lo:hi])
        rows = log.rows[lo:hi]
        keep = items >= 0
        items, rows = items[keep], rows[keep]
        hidden = model.init_hidden(1)
        for k in range(len(items) - 1):
            scores, hidden = model(torch.tensor([items[k]]), hidden)
            target = scores[0, items[k + 1]]
            gt, ge = int((scores[0] > target).sum()), int((scores[0] >= target).sum())
            ranks[int(rows[k + 1])] = {"standard": gt + 1, "conservative": ge, "median": (gt + 1 + ge) / 2}[ties]
    return ranks


@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_ranks_match_a_session_by_session_reference(ties):
    model, item_map = _model_and_map()
    table = synthetic_table(60, n_items=30, seed=5)
    with torch.no_grad():  # make ties real: two items share identical weights and bias
        model.Wy[3] = model.Wy[4]
        model.By[3] = model.By[4]
    res = evaluate(model, item_map, read_log(table), ties=ties, cutoffs=(1, 5, 20))
    naive = _naive_ranks(model, item_map, table, ties)
    assert res.target_rows.tolist() == sorted(naive)
    np.testing.assert_allclose(res.ranks, [naive[r] for r in res.target_rows])
    assert res.metrics["ties"] == ties and res.metrics["n_predictions"] == len(naive)


def test_no_state_crosses_test_sessions_whatever_their_order_or_chunking():
    model, item_map = _model_and_map(seed=1)
    table = synthetic_table(80, n_items=30, seed=6)
    base = evaluate(model, item_map, read_log(table))
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    again = evaluate(model, item_map, read_log(shuffled))
    # same events, other row numbers: compare rank per (session, item, time) event
    def keyed(res, tbl):
        keys = list(zip(*(tbl.column(c).to_pylist() for c in ("session_id", "item_id", "timestamp")), strict=True))
        return {keys[r]: rank for r, rank in zip(res.target_rows, res.ranks, strict=True)}
    assert keyed(base, table) == keyed(again, shuffled)
    tiny_chunks = evaluate(model, item_map, read_log(table), score_budget=30 * 3)  # 3 sessions at a time
    np.testing.assert_array_equal(tiny_chunks.ranks, base.ranks)
    assert tiny_chunks.metrics == base.metrics


def test_constant_scores_get_the_worst_rank_under_conservative_ties():
    model, item_map = _model_and_map(n_items=25)
    with torch.no_grad():
        model.Wy.zero_()
        model.By.zero_()
    table = synthetic_table(30, n_items=25, seed=2)
    cons = evaluate(model, item_map, read_log(table), ties="conservative")
    assert (cons.ranks == 25).all()
    assert cons.metrics["recall@20"] == 0.0 and cons.metrics["mrr@20"] == 0.0
    assert (evaluate(model, item_map, read_log(table), ties="standard").ranks == 1).all()
    assert (evaluate(model, item_map, read_log(table), ties="median").ranks == 13).all()


def test_nan_scores_rank_last():
    model, item_map = _model_and_map(n_items=10)
    with torch.no_grad():
        model.By.fill_(float("nan"))
    res = evaluate(model, item_map, read_log(synthetic_table(10, n_items=10, seed=3)))
    assert (res.ranks == 10).all()


def test_unknown_items_are_dropped_and_counted_then_short_sessions():
    item_map = ItemMap.from_ids(["a", "b", "c"], [5, 3, 1])
    table = _events([
        ("s1", "a", 1), ("s1", "x", 2), ("s1", "b", 3),  # x dropped: a -> b is one prediction
        ("s2", "c", 4), ("s2", "y", 5),  # left with one event: session dropped
        ("s3", "z", 6),  # nothing known
        ("s4", "b", 7), ("s4", "b", 8), ("s4", "c", 9),
    ])
    data = index_sessions(read_log(table), item_map)
    assert data.n_dropped_unknown == 3 and data.n_dropped_sessions == 2 and data.n_dropped_short_events == 1
    assert data.items.tolist() == [0, 1, 1, 1, 2] and data.offsets.tolist() == [0, 2, 5]
    assert data.rows.tolist() == [0, 2, 6, 7, 8]  # rows of the table as given
    model = GRU4Rec(3, (4,)).eval()
    res = evaluate(model, item_map, read_log(table))
    assert res.metrics["n_predictions"] == 3 and res.metrics["n_dropped_unknown"] == 3
    assert res.target_rows.tolist() == [2, 7, 8]


def test_pop_and_spop_baselines_by_hand():
    # popularity: a=5, b=3, c=1, d=2  (index 0..3)
    item_map = ItemMap.from_ids(["a", "b", "c", "d"], [5, 3, 1, 2])
    table = _events([("s", "c", 1), ("s", "d", 2), ("s", "c", 3), ("s", "a", 4)])
    res = evaluate(GRU4Rec(4, (4,)).eval(), item_map, read_log(table), ties="standard")
    # POP ranks a > b > d > c: targets d, c, a -> 3, 4, 1
    assert res.baseline_ranks["pop"].tolist() == [3, 4, 1]
    # S-POP: in-session counts first, popularity breaks ties.
    # after [c]: c(1) first, then a, b, d -> d is 4th; after [c, d]: c, d (1 each, d more popular) -> c is 2nd;
    # after [c, d, c]: c(2), d(1), then a -> a is 3rd
    assert res.baseline_ranks["spop"].tolist() == [4, 2, 3]
    m = res.metrics["baselines"]["spop"]
    assert m["recall@1"] == 0 and m["recall@5"] == 1 and m["mrr@5"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)
    assert set(res.metrics["baselines"]) == {"pop", "spop"}


@pytest.mark.parametrize("ties", ["conservative", "standard", "median"])
def test_spop_matches_brute_force_over_the_whole_catalogue(ties):
    rng = np.random.default_rng(4)
    n_items = 12
    counts = rng.integers(1, 5, n_items)  # many popularity ties
    item_map = ItemMap.from_ids([f"i{k}" for k in range(n_items)], counts)
    rows = [(f"s{s}", f"i{int(rng.integers(0, 5 if s % 2 else n_items))}", s * 100 + k)  # repeats in odd sessions
            for s in range(40) for k in range(int(rng.integers(2, 9)))]
    table = _events(rows)
    res = evaluate(GRU4Rec(n_items, (4,)).eval(), item_map, read_log(table), ties=ties)
    log = read_log(table)
    expected = {}
    weight = counts.max() + 1
    for s in range(log.n_sessions):
        items = item_map.index(log.item_ids[log.offsets[s] : log.offsets[s + 1]])
        rows_s = log.rows[log.offsets[s] : log.offsets[s + 1]]
        for k in range(1, len(items)):
            scores = np.bincount(items[:k], minlength=n_items) * weight + counts  # every item scored
            target = scores[items[k]]
            gt, ge = (scores > target).sum(), (scores >= target).sum()
            expected[int(rows_s[k])] = {"standard": gt + 1, "conservative": ge, "median": (gt + 1 + ge) / 2}[ties]
    np.testing.assert_array_equal(res.baseline_ranks["spop"], [expected[r] for r in res.target_rows])


def test_metrics_formulas():
    ranks = np.array([1, 2, 5, 21, 20.5])
    m = metrics_from_ranks(ranks, (1, 5, 20))
    assert m["recall@1"] == pytest.approx(1 / 5) and m["mrr@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(3 / 5) and m["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert m["recall@20"] == pytest.approx(3 / 5)  # 20.5 (a median rank) is not within 20


def test_evaluate_model_json_contract_and_argument_checks(synth, tmp_path):
    train(synth["train"], tiny_config(n_epochs=1), tmp_path / "m", device="cpu")
    res = evaluate_model(tmp_path / "m", synth["test"], cutoffs=(1, 5, 10, 20), device="cpu")
    keys = {f"{m}@{k}" for m in ("recall", "mrr") for k in (1, 5, 10, 20)}
    assert keys | {"n_predictions", "n_dropped_unknown", "baselines"} <= set(res.metrics)
    for name in ("pop", "spop"):
        assert keys | {"n_predictions", "n_dropped_unknown"} <= set(res.metrics["baselines"][name])
    json.dumps(res.metrics)  # plain JSON
    assert res.ranks.dtype == np.float64 and len(res.ranks) == len(res.target_rows) == res.metrics["n_predictions"]
    with pytest.raises(ConfigError, match="ties"):
        evaluate_model(tmp_path / "m", synth["test"], ties="optimistic")
    with pytest.raises(ConfigError, match="cutoffs"):
        evaluate_model(tmp_path / "m", synth["test"], cutoffs=(0,))
    with pytest.raises(InputError, match="not a trained model directory"):
        evaluate_model(tmp_path, synth["test"])


def _dataset_dir(root: Path) -> Path:
    """A session dataset built by the data layer (pipeline.data.sessions), as `python -m pipeline build` does."""
    from pipeline.config import BuildConfig
    from pipeline.data.sessions import build_splits, write_dataset

    events = pa.concat_tables([synthetic_table(200, seed=0), synthetic_table(200, seed=1)])
    splits = build_splits(events, BuildConfig(test_days=0.2, valid_days=0.2, min_item_support=0))
    write_dataset(splits, str(root))
    return root


def test_reads_dataset_dirs_tsv_and_parquet_and_keeps_the_dataset_item_index(tmp_path):
    ds = _dataset_dir(tmp_path / "ds")
    train_log = read_log(ds, "train")
    item_map = build_item_map(train_log)
    items = pq.read_table(ds / "items").sort_by("item_idx")
    assert item_map.item_ids.to_pylist() == items.column("item_id").to_pylist()
    assert item_map.counts.tolist() == items.column("count").to_pylist()
    # the same split handed over as a table (what sessions.read_split returns) keeps the same index
    from_table = build_item_map(read_log(pq.read_table(ds / "train"), "train"))
    assert from_table.item_ids.to_pylist() == item_map.item_ids.to_pylist()
    assert read_log(ds, "test").n_events == pq.read_table(ds / "test").num_rows > 0
    # GRU4Rec order: sessions by start time, events by time, whatever the row order on disk
    table = synthetic_table(40, seed=9)
    tsv = read_log(write_tsv(table, tmp_path / "x.tsv"))
    times = table.column("timestamp").cast(pa.int64()).to_numpy()[tsv.rows]
    sessions = np.array(table.column("session_id").to_pylist())[tsv.rows]
    assert tsv.n_sessions == 40
    starts = times[tsv.offsets[:-1]]
    assert (np.diff(starts) >= 0).all()
    for lo, hi in zip(tsv.offsets[:-1], tsv.offsets[1:], strict=True):
        assert len(set(sessions[lo:hi])) == 1 and (np.diff(times[lo:hi]) >= 0).all()
    assert tsv.item_ids.to_pylist() == np.array(table.column("item_id").to_pylist())[tsv.rows].tolist()


def test_train_and_evaluate_on_a_session_dataset(tmp_path):
    ds = _dataset_dir(tmp_path / "ds")
    res = train(ds, tiny_config(n_epochs=1), tmp_path / "m", valid=ds, device="cpu")
    assert len(res.valid_metrics) == 1
    ev = evaluate_model(tmp_path / "m", ds, device="cpu")  # a dataset directory means its test split
    assert ev.metrics["n_predictions"] == pq.read_table(ds / "test").num_rows - len(set(pq.read_table(ds / "test").column("session_id").to_pylist()))


def test_input_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_log(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"foo": [1]}), bad)
    with pytest.raises(InputError, match=r"bad\.parquet"):
        read_log(bad)
    with pytest.raises(InputError, match="no timestamp column"):
        read_log(pa.table({"session_id": ["a"], "item_id": ["x"]}))
    with pytest.raises(InputError, match="session_id has 1 missing"):
        read_log(pa.table({"session_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1.0, 2.0]}))
