"""Training: hidden-state resets, sampled scoring, whole epochs, NaN stop, seeds, checkpoints and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from gru4rec_testdata import synthetic_table, tiny_config, write_tsv
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.errors import TrainingError
from pipeline.model.clicks import build_item_map, index_sessions, read_log
from pipeline.model.predict import build_model
from pipeline.model.schedule import DeviceSchedule, Schedule, build_schedule
from pipeline.model.step import Trainer, matmul_math, step_rows
from pipeline.model.train import train

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _setup(path, **cfg):
    log = read_log(path)
    item_map = build_item_map(log)
    data = index_sessions(log, item_map)
    config = tiny_config(**cfg)
    torch.manual_seed(0)
    model = build_model(config, len(item_map))
    sched = build_schedule(data.items, data.offsets, config.batch_size)
    return model, Trainer(model, config, item_map.counts, CPU), sched, data


def test_hidden_state_is_reset_exactly_for_rows_whose_session_starts(tmp_path):
    """With no updates (lr 0), the state every row receives must equal running its own session alone
    from a zero state: resetting the wrong rows, or not resetting, breaks the equality."""
    path = write_tsv(synthetic_table(60, seed=4), tmp_path / "t.tsv")
    model, trainer, sched, data = _setup(path, batch_size=5, learning_rate=0.0, momentum=0.0, layers=(8, 6),
                                         matmul_precision="highest")  # float32 products, like model.step
    seen = []
    trainer.run_epoch(DeviceSchedule.of(sched, CPU), 0, step_hook=lambda t, x, h: seen.append([v.clone() for v in h]))
    assert len(seen) == sched.n_steps
    position: dict[int, int] = {}
    model.eval()
    with torch.no_grad():
        for t in range(sched.n_steps):
            for row, entry in enumerate(range(sched.bounds[t], sched.bounds[t + 1])):
                s = int(sched.session_of[entry])
                k = position.get(s, 0)
                position[s] = k + 1
                assert bool(sched.fresh[entry]) == (k == 0)
                hidden = model.init_hidden(1)
                for item in data.items[data.offsets[s] : data.offsets[s] + k]:
                    _, hidden = model.step(model.input_table[torch.tensor([item])], hidden)
                for layer, h in enumerate(hidden):
                    torch.testing.assert_close(seen[t][layer][row], h[0], atol=1e-6, rtol=1e-5)
    assert sum(position.values()) == sched.n_predictions


class _OutputShapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not name.rstrip(".default").endswith("_"):  # in-place ops return self
                self.outputs.append((name, tuple(t.shape)))
        return out


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
def test_a_step_scores_only_targets_and_samples_never_the_catalogue(loss):
    """A 5000-item catalogue: a step that scored every item would build a (batch x 5000) matrix. The score
    matrix has one column per distinct row of the step's inputs, targets and samples."""
    import numpy as np

    n_items, batch, n_sample = 5000, 8, 16
    config = tiny_config(layers=(4,), batch_size=batch, n_sample=n_sample, loss=loss, elu_param=0.5, bpreg=1.0)
    model = build_model(config, n_items)
    trainer = Trainer(model, config, np.ones(n_items, np.int64), CPU)
    schedule = Schedule(np.arange(batch), np.arange(batch) + 100, np.ones(batch, bool), np.array([0, batch]), {}, np.arange(batch))
    block = trainer.plan(schedule, 0, 1, np.random.default_rng(0))
    step = step_rows(block, 0, 0, batch)
    distinct = len(set(range(batch)) | set(range(100, 100 + batch)) | set(step.rows.device.tolist()))
    assert len(step.rows.device) == distinct <= 2 * batch + n_sample
    hidden = model.init_hidden(batch)
    with _OutputShapes() as probe:
        _, new_hidden = trainer._step(step, hidden)
    assert all(h.grad_fn is None and not h.requires_grad for h in new_hidden)  # no backprop across steps
    sizes = [(name, shape) for name, shape in probe.outputs if torch.Size(shape).numel() >= batch * n_items]
    assert not sizes, f"catalogue-sized intermediate results: {sizes}"
    assert any(shape == (batch, distinct) for _, shape in probe.outputs)  # scores of the step's rows only


def test_nan_loss_stops_training_with_a_clear_error(synth, tmp_path):
    with pytest.raises(TrainingError, match=r"loss became (nan|inf)"):
        train(synth["train"], tiny_config(learning_rate=1e30), tmp_path / "m", device="cpu")
    assert not (tmp_path / "m" / "checkpoint.pt").exists()  # no checkpoint of a diverged model


def test_same_seed_same_model_other_seed_other_model(synth, tmp_path):
    cfg = tiny_config(dropout_p_hidden=0.3, dropout_p_embed=0.2)
    a = train(synth["train"], cfg, tmp_path / "a", device="cpu")
    b = train(synth["train"], cfg, tmp_path / "b", device="cpu")
    c = train(synth["train"], tiny_config(dropout_p_hidden=0.3, dropout_p_embed=0.2, seed=7), tmp_path / "c", device="cpu")
    sa, sb, sc = (torch.load(p / "checkpoint.pt", weights_only=True)["state_dict"] for p in (a.model_dir, b.model_dir, c.model_dir))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["Wy"], sc["Wy"])
    assert a.epoch_loss == b.epoch_loss


def test_checkpoint_is_plain_data_with_everything_needed(synth, tmp_path):
    res = train(synth["train"], tiny_config(), tmp_path / "m", valid=synth["test"], device="cpu")
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert {"state_dict", "config", "item_ids", "item_counts", "optimizer", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["layers"] == [16]
    assert all(isinstance(i, str) for i in ckpt["item_ids"])
    metrics = json.loads((tmp_path / "m" / "train_metrics.json").read_text())
    assert metrics["train_seconds"] > 0 and metrics["train_events_per_second"] > 0
    assert len(metrics["epoch_loss"]) == 2 and len(metrics["valid"]) == 2
    assert metrics["epoch_loss"][1] < metrics["epoch_loss"][0]
    assert res.valid_metrics[-1]["recall@20"] > 0.5  # the ring pattern is easy to learn


def test_on_epoch_end_gets_each_epoch_metrics(synth, tmp_path):
    calls = []
    train(synth["train"], tiny_config(n_epochs=3), tmp_path / "m", valid=synth["test"], device="cpu",
          on_epoch_end=lambda e, m: calls.append((e, m)))
    assert [e for e, _ in calls] == [1, 2, 3]
    assert {"loss", "epoch_seconds", "train_events_per_second", "valid_recall@20", "valid_mrr@20"} <= set(calls[0][1])
    assert all(isinstance(v, float) for _, m in calls for v in m.values())


def test_interrupted_training_resumes_to_the_identical_model(synth, tmp_path):
    cfg = tiny_config(n_epochs=3, dropout_p_hidden=0.2)
    full = train(synth["train"], cfg, tmp_path / "full", device="cpu")

    def crash(epoch, _):
        if epoch == 1:
            raise KeyboardInterrupt  # dies right after the checkpoint of epoch 1

    with pytest.raises(KeyboardInterrupt):
        train(synth["train"], cfg, tmp_path / "part", device="cpu", on_epoch_end=crash)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train(synth["train"], cfg, tmp_path / "part", device="cpu")
    assert resumed.resumed_from_epoch == 1 and resumed.epochs == 3
    assert resumed.epoch_loss == full.epoch_loss
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # a finished run is returned as is; other settings are refused, --no-resume starts over
    again = train(synth["train"], cfg, tmp_path / "part", device="cpu")
    assert again.resumed_from_epoch == 3 and again.epoch_loss == full.epoch_loss
    with pytest.raises(TrainingError, match="other settings .*learning_rate"):
        train(synth["train"], tiny_config(n_epochs=3, learning_rate=0.3), tmp_path / "part", device="cpu")
    fresh = train(synth["train"], tiny_config(n_epochs=1), tmp_path / "part", device="cpu", resume=False)
    assert fresh.resumed_from_epoch == 0 and fresh.epochs == 1


def test_killed_training_process_resumes_to_the_identical_model(tmp_path):
    """SIGKILL the CLI mid-run (after some epoch's checkpoint), rerun it: same final weights as no kill."""
    data = write_tsv(synthetic_table(1500, n_items=60, seed=3), tmp_path / "train.tsv")
    sets = ["n_epochs=6", "layers=[16]", "batch_size=16", "n_sample=16", "dropout_p_hidden=0.2", "learning_rate=0.1", "momentum=0.1"]
    cfg = tiny_config(n_epochs=6, layers=(16,), batch_size=16, n_sample=16, dropout_p_hidden=0.2)
    cmd = [sys.executable, "-m", "pipeline", "train", "--train", str(data), "--out", str(tmp_path / "killed"), "--device", "cpu"]
    for s in sets:
        cmd += ["--set", f"gru4rec.{s}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "training finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 6
    resumed = train(data, cfg, tmp_path / "killed", device="cpu")
    assert resumed.resumed_from_epoch == done
    full = train(data, cfg, tmp_path / "full", device="cpu")
    assert resumed.epoch_loss == full.epoch_loss
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tsv_parquet_and_table_inputs_train_the_same_model(synth, tmp_path):
    a = train(synth["train"], tiny_config(n_epochs=1), tmp_path / "tsv", device="cpu")
    b = train(synth["train_parquet"], tiny_config(n_epochs=1), tmp_path / "pq", device="cpu")
    c = train(pq.read_table(synth["train_parquet"]), tiny_config(n_epochs=1), tmp_path / "tbl", device="cpu")
    assert a.epoch_loss == b.epoch_loss == c.epoch_loss


def test_threads_setting_is_restored(synth, tmp_path):
    before = torch.get_num_threads()
    train(synth["train"], tiny_config(n_epochs=1), tmp_path / "m", device="cpu", threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("precision", ["medium", "highest"])
def test_steps_run_under_the_configured_matmul_precision_and_it_is_restored(synth, tmp_path, precision):
    """The setting holds while the steps run (even when the epoch fails) and is the process's own again
    afterwards, so validation and evaluation multiply in float32; train_metrics.json says what it gave."""
    assert torch.get_float32_matmul_precision() == "highest"
    model, trainer, sched, _ = _setup(synth["train"], matmul_precision=precision)
    seen = []
    trainer.run_epoch(DeviceSchedule.of(sched, CPU), 0, step_hook=lambda t, x, h: seen.append(torch.get_float32_matmul_precision()))
    assert set(seen) == {precision} and torch.get_float32_matmul_precision() == "highest"

    def fail(t, x, h):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        trainer.run_epoch(DeviceSchedule.of(sched, CPU), 1, step_hook=fail)
    assert torch.get_float32_matmul_precision() == "highest"
    res = train(synth["train"], tiny_config(n_epochs=1, matmul_precision=precision), tmp_path / "m", device="cpu")
    assert res.metrics["matmul_math"] == matmul_math(precision, CPU)
    assert res.metrics["config"]["matmul_precision"] == precision


def test_matmul_math_says_how_the_products_are_really_computed(synth):
    """"medium" gives the step bfloat16 products (operands and results rounded, float32-close) exactly when the
    run reports bfloat16; on a CPU without native bfloat16 they stay float32, bit for bit, and so does the report."""
    g = torch.Generator().manual_seed(0)
    out, rows = torch.randn(80, 224, generator=g), torch.randn(1400, 224, generator=g)
    exact = out @ rows.t()
    _, medium, _, _ = _setup(synth["train"], matmul_precision="medium")
    _, highest, _, _ = _setup(synth["train"], matmul_precision="highest")
    fast = medium.products.mm(out, rows.t())
    if matmul_math("medium", CPU) == "bfloat16":
        assert torch.equal(fast, (out.bfloat16() @ rows.t().bfloat16()).float())
        torch.testing.assert_close(fast, exact, rtol=0, atol=2e-2 * float(exact.abs().max()))
    else:
        assert torch.equal(fast, exact)
    assert torch.equal(highest.products.mm(out, rows.t()), exact)
    assert matmul_math("highest", CPU) == "float32"


def test_bfloat16_products_train_like_float32_ones(synth, tmp_path):
    """Two epochs on the synthetic log with each kind of product: the losses agree to ~1% (bfloat16 rounds
    every product's operands to 8 bits of mantissa, and the roundings do not pile up over the steps)."""
    if matmul_math("medium", CPU) != "bfloat16":
        pytest.skip("this CPU has no native bfloat16: medium keeps float32 products here")
    fast = train(synth["train"], tiny_config(n_epochs=2, matmul_precision="medium"), tmp_path / "bf16", device="cpu")
    exact = train(synth["train"], tiny_config(n_epochs=2, matmul_precision="highest"), tmp_path / "f32", device="cpu")
    assert fast.metrics["matmul_math"] == "bfloat16" and exact.metrics["matmul_math"] == "float32"
    assert fast.epoch_loss != exact.epoch_loss
    assert fast.epoch_loss == pytest.approx(exact.epoch_loss, rel=1e-2)


def test_an_unknown_matmul_precision_is_refused_by_name():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"matmul_precision must be one of highest, high, medium, got 'bf16'"):
        tiny_config(matmul_precision="bf16")
