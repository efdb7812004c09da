"""``pneumo-ray sweep | leaderboard``: argument parsing, and bad input as one line + exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl+C


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumo-ray", description="Distributed hyperparameter sweeps for "
                                     "pneumonia classification on chest X-rays (Ray Train + Tune + Optuna).")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run or resume a sweep, then write the test leaderboard")
    sweep.add_argument("--config", default="sweeps/configs/default.yaml", help="sweep YAML (default: %(default)s)")
    sweep.add_argument("--data", help="synthetic | npz:PATH | folder:PATH | medmnist:SIZE[:ROOT]")
    sweep.add_argument("--storage", help="results folder or cloud URI such as s3://bucket/prefix (experiment.storage)")
    sweep.add_argument("--name", help="experiment name (experiment.name)")
    sweep.add_argument("--num-samples", type=_positive_int, help="number of trials (search.num_samples)")
    sweep.add_argument("--epochs", type=_positive_int, help="epochs per trial (train.epochs)")
    sweep.add_argument("--address", help="join a running Ray cluster (e.g. auto, or HOST:PORT); default: local Ray")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted experiment of this name")

    board = sub.add_parser("leaderboard", help="print the leaderboard of a finished experiment")
    board.add_argument("experiment", help="experiment folder or URI (<storage>/<name>)")
    return parser


def sweep_overrides(args: argparse.Namespace) -> dict:
    from pneumo_ray.config import parse_data_spec

    overrides = parse_data_spec(args.data) if args.data else {}
    for flag, key in (("storage", "experiment.storage"), ("name", "experiment.name"),
                      ("num_samples", "search.num_samples"), ("epochs", "train.epochs")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def cmd_sweep(args: argparse.Namespace) -> int:
    from pneumo_ray import config, sweep
    from pneumo_ray.leaderboard import to_markdown

    cfg = config.load(args.config, sweep_overrides(args))
    prepared = sweep.prepare(cfg, resume=args.resume)  # every check that can fail does so before Ray starts
    rows = sweep.run(prepared, address=args.address)
    exp = prepared.cfg.experiment
    if rows is None:
        print(f"\nSweep interrupted; its state is saved. Continue it with:\n  python sweeps/run.py --resume "
              f"--storage {exp.storage} --name {exp.name}")
        return EXIT_INTERRUPTED
    print(f"\nTest leaderboard (top {len(rows)} by {prepared.cfg.search.metric}; test split used once, here):\n")
    print(to_markdown(rows) if rows else "no trial finished an epoch")
    print(f"Outputs in {prepared.cfg.experiment_uri}: leaderboard.csv/.json/.md, best/, {sweep.OPTUNA_FILE}, trial folders")
    return 0 if rows else 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from pneumo_ray import storage
    from pneumo_ray.config import ConfigError

    where = args.experiment if storage.is_remote(args.experiment) else str(Path(args.experiment).resolve())
    path = storage.join(where, "leaderboard.md")
    if not storage.exists(path):
        raise ConfigError(f"{path}: no leaderboard here; pass an experiment folder whose sweep has finished")
    print(storage.read_text(path))
    return 0


def main(argv: list[str] | None = None) -> int:
    from pneumo_ray.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return {"sweep": cmd_sweep, "leaderboard": cmd_leaderboard}[args.command](args)
    except ConfigError as err:
        print(f"pneumo-ray: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
