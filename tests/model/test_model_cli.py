"""`python -m pipeline train | evaluate | tune`: the CLI contract other tools rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.cli.main import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "gru4rec.layers=[16]", "--set", "gru4rec.batch_size=8", "--set", "gru4rec.n_sample=16",
        "--set", "gru4rec.n_epochs=2"]


def test_train_then_evaluate_end_to_end(synth, tmp_path, capsys):
    rsc15 = tmp_path / "rsc15.yaml"  # a GRU4Rec-only file of published names (--gru4rec)
    rsc15.write_text("loss: cross-entropy\nlayers: [32]\nbatch_size: 8\nn_sample: 16\nmomentum: 0.1\nn_epochs: 1\n")
    pipeline_config = tmp_path / "pipeline.yaml"  # the pipeline config (--config), under the GRU4Rec-only file
    pipeline_config.write_text("gru4rec:\n  momentum: 0.3\n  seed: 7\neval:\n  ties: standard\n")
    out = tmp_path / "model"
    rc = main(["train", "--train", str(synth["train"]), "--valid", str(synth["test"]), "--config", str(pipeline_config),
               "--gru4rec", str(rsc15), "--set", "gru4rec.n_epochs=2", "--set", "gru4rec.dropout_p_hidden=0.1",
               "--out", str(out), "--device", "auto"])
    assert rc == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["layers"] == [32] and ckpt["config"]["n_epochs"] == 2  # --set wins over the files
    assert ckpt["config"]["dropout_p_hidden"] == 0.1 and ckpt["config"]["momentum"] == 0.1  # --gru4rec over --config
    assert ckpt["config"]["seed"] == 7
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert {"train_seconds", "train_events_per_second", "epoch_loss", "valid"} <= set(metrics)
    assert "trained 2 epochs" in capsys.readouterr().out

    rc = main(["evaluate", "--model", str(out), "--test", str(synth["test"]), "--cutoffs", "5", "20",
               "--config", str(pipeline_config), "--json", str(tmp_path / "eval" / "m.json")])  # ties from eval.ties
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GRU4Rec" in printed and "S-POP" in printed and "recall@20" in printed
    result = json.loads((tmp_path / "eval" / "m.json").read_text())
    assert set(result) >= {"recall@5", "mrr@5", "recall@20", "mrr@20", "n_predictions", "n_dropped_unknown", "baselines"}
    assert "recall@1" not in result and result["ties"] == "standard"
    assert set(result["baselines"]["spop"]) >= {"recall@20", "mrr@20", "n_predictions", "n_dropped_unknown"}


def test_errors_are_messages_not_tracebacks(synth, tmp_path, capsys):
    def run(*args):
        code = main(list(args))  # PipelineErrors become a message and an exit code; anything else would raise
        return code, capsys.readouterr().err

    train = ("train", "--train", str(synth["train"]), "--out", str(tmp_path / "m"))
    code, err = run(*train, "--set", "gru4rec.learnin_rate=0.1")
    assert code == 2 and "unknown setting(s) gru4rec.learnin_rate" in err and "--set gru4rec.learnin_rate=0.1" in err
    code, err = run(*train, "--set", "gru4rec.dropout_p_hidden=1.5")
    assert code == 2 and "dropout_p_hidden is a drop probability" in err and "(from --set gru4rec.dropout_p_hidden=1.5)" in err
    code, err = run(*train, "--set", "layers=[16]")  # a flat name: the section is named in the hint
    assert code == 2 and "unknown setting(s) layers" in err and "did you mean gru4rec.layers?" in err
    code, err = run("train", "--train", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "m"))
    assert code == 2 and "input not found" in err and "nope.tsv" in err
    code, err = run("evaluate", "--model", str(tmp_path / "nothing"), "--test", str(synth["test"]))
    assert code == 2 and "not a trained model directory" in err
    if not torch.cuda.is_available():
        code, err = run("train", "--train", str(synth["train"]), "--out", str(tmp_path / "m"), "--device", "cuda:7", *TINY)
        assert code == 2 and "no usable CUDA GPU" in err


def test_module_entry_point_prints_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--model", str(tmp_path), "--test", "x.tsv"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a trained model directory" in proc.stderr and "Traceback" not in proc.stderr


def test_tune_cli_runs_a_bounded_search(synth, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "learning_rate: {type: float, low: 0.05, high: 0.2, log: true}\n"
        "layers: {type: categorical, choices: [8, [16]]}\n"
    )
    rc = main(["tune", "--train", str(synth["train"]), "--valid", str(synth["test"]), "--space", str(space),
               "--n-trials", "2", "--out", str(tmp_path / "tune"), *TINY, "--set", "gru4rec.n_epochs=1"])
    assert rc == 0
    lines = (tmp_path / "tune" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 2
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["metric"] == "mrr@20" and best["best_value"] == max(json.loads(line)["objective"] for line in lines)
    assert json.loads((tmp_path / "tune" / "best_config.json").read_text())["n_epochs"] == 1
