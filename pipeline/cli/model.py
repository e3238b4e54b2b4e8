"""Model sub-commands: ``train``, ``evaluate`` and ``tune`` (argparse only here; handlers import lazily).

Settings come from the pipeline config like every command's (``--config``, ``--set gru4rec.NAME=VALUE``,
``--gru4rec FILE`` for a GRU4Rec-only file): see pipeline.cli.settings.
"""

from __future__ import annotations

import argparse

from pipeline.cli.settings import add_config_args, load_settings
from pipeline.config import TIES  # the allowed values of eval.ties

INPUT_HELP = "a GRU4Rec TSV file (SessionId<TAB>ItemId<TAB>Time), a Parquet file of events or a session dataset directory"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_tune(subparsers)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train GRU4Rec (session-parallel, sampled output, Adagrad) and write a model directory",
        description="Train GRU4Rec with the config's gru4rec section. Parameters keep their published names (loss, "
        "layers, batch_size, learning_rate, momentum, n_sample, sample_alpha, dropout_p_embed, dropout_p_hidden, "
        "constrained_embedding, embedding, elu_param, bpreg, logq, n_epochs, seed): --set gru4rec.layers=[100], or "
        "a GRU4Rec-only file with --gru4rec FILE. Re-running with the same --out resumes after the last finished epoch.",
    )
    p.add_argument("--train", required=True, metavar="PATH", help=f"training data: {INPUT_HELP} (its train split)")
    p.add_argument("--valid", metavar="PATH", help="validation data, evaluated after every epoch (a dataset's valid split)")
    add_config_args(p, example="gru4rec.layers=[100]", gru4rec=True)
    p.add_argument("--out", required=True, metavar="DIR", help="model directory (checkpoint.pt, train_metrics.json)")
    _runtime_args(p)
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.set_defaults(handler=_train)


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="full-ranking next-item evaluation of a trained model, with POP and S-POP baselines",
        description="Recall@N and MRR@N of every next-item prediction, ranked against all training items; "
        "unknown test items are dropped and counted; each test session starts from a zero state.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="a model directory written by `train`")
    p.add_argument("--test", required=True, metavar="PATH", help=f"test data: {INPUT_HELP} (its test split)")
    p.add_argument("--cutoffs", type=int, nargs="+", metavar="N", help="list lengths N (default: eval.cutoffs, 1 5 10 20)")
    p.add_argument(
        "--ties",
        choices=TIES,
        help="rank of tied scores (default: eval.ties): conservative = #(scores >= target) (default), "
        "standard = 1 + #(>), median = their mean",
    )
    add_config_args(p, example="eval.ties=standard")
    p.add_argument("--json", metavar="OUT", help="also write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.set_defaults(handler=_evaluate)


def _register_tune(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="bounded hyperparameter search (Optuna) on train/valid, maximising a validation metric",
        description="Each trial trains one config (reproducible from its seed) and evaluates it on --valid.",
    )
    p.add_argument("--train", required=True, metavar="PATH", help=f"training data: {INPUT_HELP}")
    p.add_argument("--valid", required=True, metavar="PATH", help="validation data (a dataset's valid split)")
    add_config_args(p, example="gru4rec.n_epochs=2", gru4rec=True)
    p.add_argument("--space", metavar="FILE", help="search space (YAML/JSON: parameter -> {type, choices | low, high, ...})")
    p.add_argument("--n-trials", type=int, default=20, help="number of trials (default 20)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this long")
    p.add_argument("--metric", default="mrr@20", help="validation metric to maximise (default mrr@20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's sampler (each trial has its own config seed)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (e.g. postgresql://...) shared by parallel workers")
    p.add_argument("--study-name", default="gru4rec")
    p.add_argument("--out", required=True, metavar="DIR", help="trial models, trials.jsonl, best.json, best_config.json")
    _runtime_args(p)
    p.set_defaults(handler=_tune)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for training (0 = automatic)")


def _train(args: argparse.Namespace) -> int:
    from pipeline.model.train import train

    config = load_settings(args).gru4rec
    result = train(
        args.train, config, args.out, valid=args.valid, device=args.device, resume=not args.no_resume, threads=args.threads
    )
    last = result.valid_metrics[-1] if result.valid_metrics else {}
    print(
        f"trained {result.epochs} epochs in {result.train_seconds:.1f} s "
        f"({result.train_events_per_second:.0f} events/s), final loss {result.epoch_loss[-1]:.4f}"
        + "".join(f", valid {k} {v:.4f}" for k, v in last.items() if k != "epoch")
        + f"; model in {result.model_dir}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pipeline.model.evaluate import evaluate_model, format_table

    settings = load_settings(args).eval
    cutoffs = tuple(args.cutoffs) if args.cutoffs else settings.cutoffs
    result = evaluate_model(args.model, args.test, cutoffs=cutoffs, ties=args.ties or settings.ties, device=args.device)
    print(format_table(result.metrics))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.metrics, indent=2))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipeline.model.tune import SearchSpace, search

    result = search(
        args.train,
        args.valid,
        load_settings(args).gru4rec,
        args.out,
        space=SearchSpace.load(args.space),
        n_trials=args.n_trials,
        timeout_s=args.timeout,
        metric=args.metric,
        seed=args.seed,
        storage=args.storage,
        study_name=args.study_name,
        device=args.device,
        threads=args.threads,
    )
    print(f"best {args.metric} = {result.best_value:.4f} (trial {result.best_trial}); config in {result.out_dir / 'best_config.json'}")
    return 0
