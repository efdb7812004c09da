"""``pneumo-ray sweep | validate | leaderboard | report | predict | export | lr-find``: argument parsing, and
bad input as one line + exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from pneumo_ray import package_version
from pneumo_ray.layout import CONFIG_FILE, REPORT_FILE

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl+C


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _setting(text: str) -> tuple[str, object]:
    """``--set section.field=VALUE``: VALUE is read as YAML, so numbers, booleans, lists and null work as in
    the config file; what the field accepts is the config's validation to say."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not all(part.isidentifier() for part in key.split(".")) or "." not in key:
        raise argparse.ArgumentTypeError(f"expected section.field=VALUE, such as train.epochs=3, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a YAML value") from None


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="sweeps/configs/default.yaml", help="sweep YAML (default: %(default)s)")
    parser.add_argument("--data", help="synthetic | npz:PATH | folder:PATH | medmnist:SIZE[:ROOT]")
    parser.add_argument("--storage", help="results folder or cloud URI such as s3://bucket/prefix (experiment.storage)")
    parser.add_argument("--name", help="experiment name (experiment.name)")
    parser.add_argument("--num-samples", type=_positive_int, help="number of trials (search.num_samples)")
    parser.add_argument("--epochs", type=_positive_int, help="epochs per trial (train.epochs)")
    parser.add_argument("--address", help="join a running Ray cluster (e.g. auto, or HOST:PORT); default: local Ray")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment of this name")
    parser.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, e.g. --set search.sampler=grid --set search.lr=[1e-4,1e-3] "
                        "(repeatable; VALUE is YAML; after the other flags)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumo-ray", description="Distributed hyperparameter sweeps for "
                                     "pneumonia classification on chest X-rays (Ray Train + Tune + Optuna).")
    parser.add_argument("--version", action="version", version=f"pneumo-ray {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run or resume a sweep, then write the test leaderboard")
    add_sweep_flags(sweep)
    validate = sub.add_parser("validate", help="check a sweep's config, data and models and print its plan and an "
                              "estimated time, without starting Ray (takes the sweep's flags)")
    add_sweep_flags(validate)

    board = sub.add_parser("leaderboard", help="print the leaderboard of a finished experiment")
    board.add_argument("experiment", help="experiment folder or URI (<storage>/<name>)")

    report = sub.add_parser("report", help="re-score a finished experiment's kept trials on test and write "
                            f"leaderboard.* and {REPORT_FILE} again (with the config's leaderboard settings)")
    report.add_argument("experiment", help="experiment folder or URI (<storage>/<name>)")

    lr_find = sub.add_parser("lr-find", help="LR range test for one model: plots the loss against a rising LR "
                             "and suggests search.lr (in this process, no Ray; train split only)")
    lr_find.add_argument("--config", default="sweeps/configs/default.yaml", help="sweep YAML (default: %(default)s)")
    lr_find.add_argument("--data", help="synthetic | npz:PATH | folder:PATH | medmnist:SIZE[:ROOT]")
    lr_find.add_argument("--model", help="a search.model entry or any model name (default: the first entry)")
    lr_find.add_argument("--steps", type=_positive_int, default=200, help="training steps (default: %(default)s)")
    lr_find.add_argument("--out", help="the plot's PNG path (default: lr_find_<model>.png)")

    export = sub.add_parser("export", help="write a ranked model or the ensemble as one file (TorchScript, ONNX or "
                            "safetensors) with preprocess.json: everything another program needs to predict the same")
    export.add_argument("experiment", help="folder of a finished experiment (<storage>/<name>)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--rank", type=_positive_int, default=1, help="the model at this leaderboard rank (default: "
                       "%(default)s)")
    which.add_argument("--ensemble", action="store_true", help="the mean probability of the top-k models, as one graph")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx", "safetensors"))
    export.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the files")

    predict = sub.add_parser("predict", help="pneumonia probability and label for PNG/JPEG chest X-rays")
    predict.add_argument("experiment", help="folder of a finished experiment (<storage>/<name>)")
    which = predict.add_mutually_exclusive_group()
    which.add_argument("--rank", type=_positive_int, default=1, help="use the model at this leaderboard rank "
                       "(default: %(default)s)")
    which.add_argument("--ensemble", action="store_true", help="use the mean probability of the top-k models")
    predict.add_argument("--cam", metavar="DIR", help="also write a Grad-CAM overlay PNG per image into DIR")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, any size)")
    return parser


def parse_data_spec(spec: str) -> dict:
    """``synthetic | npz:PATH | folder:PATH | medmnist:SIZE[:ROOT]`` -> data.* overrides."""
    from pneumo_ray.errors import ConfigError
    from pneumo_ray.validation import MEDMNIST_SIZES

    kind, _, rest = spec.partition(":")
    if kind == "synthetic" and not rest:
        return {"data.source": "synthetic"}
    if kind in ("npz", "folder") and rest:
        return {"data.source": kind, "data.path": rest}
    if kind == "medmnist":
        size, _, root = rest.partition(":")
        out = {"data.source": "medmnist"}
        if size:
            if not size.isdigit():
                raise ConfigError(f"--data {spec}: size must be one of {MEDMNIST_SIZES}")
            out["data.size"] = int(size)
        if root:
            out["data.root"] = root
        return out
    raise ConfigError(f"--data {spec}: expected synthetic, npz:PATH, folder:PATH or medmnist:SIZE[:ROOT]")


def sweep_overrides(args: argparse.Namespace) -> dict:
    overrides = parse_data_spec(args.data) if args.data else {}
    for flag, key in (("storage", "experiment.storage"), ("name", "experiment.name"),
                      ("num_samples", "search.num_samples"), ("epochs", "train.epochs")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    overrides.update(args.settings)
    return overrides


def cmd_sweep(args: argparse.Namespace) -> int:
    from pneumo_ray import config, storage, sweep
    from pneumo_ray.errors import NothingToRank
    from pneumo_ray.layout import LEADERBOARD_MD

    cfg = config.load(args.config, sweep_overrides(args))
    # every check that can fail does so before Ray starts
    prepared = sweep.prepare(cfg, resume=args.resume, local=not args.address)
    exp, exp_uri = prepared.cfg.experiment, prepared.cfg.experiment_uri
    try:
        outcome = sweep.run(prepared, address=args.address)
    except NothingToRank as err:
        print(f"pneumo-ray: error: {err}", file=sys.stderr)
        print(outputs_line(exp_uri))
        return err.exit_code
    if not outcome.finished:
        print(f"\nSweep interrupted; its state is saved. Continue it with:\n  python sweeps/run.py --resume "
              f"--storage {exp.storage} --name {exp.name}")
        return EXIT_INTERRUPTED
    print(f"\nTest leaderboard ({prepared.cfg.search.metric} picks the top {prepared.cfg.leaderboard.top_k}):\n")
    print(storage.read_text(storage.join(exp_uri, LEADERBOARD_MD)))
    print(outputs_line(exp_uri))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from pneumo_ray import cluster, config, plan, sweep
    from pneumo_ray.errors import ConfigError

    cfg = config.load(args.config, sweep_overrides(args))
    local = not args.address
    prepared = sweep.prepare(cfg, resume=args.resume, local=local, check_ray=False)
    print(f"# the resolved config (what the sweep saves as {CONFIG_FILE})")
    print(yaml.safe_dump(prepared.cfg.to_dict(), sort_keys=False))
    print("# the plan")
    print("\n".join(plan.plan_lines(prepared.cfg, prepared.splits, local)))
    if local:
        try:
            cluster.check_no_other_ray()
        except ConfigError as err:  # not the config's fault: said, but the config is valid
            print(f"note: {err}")
    print("OK: config, data and models are valid; nothing was started or written")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pneumo_ray import config
    from pneumo_ray.errors import BadArgument
    from pneumo_ray.model_settings import check_pretrained_weights
    from pneumo_ray.models import check_model_name
    from pneumo_ray.sweep import load_sweep_splits

    cfg = config.load(args.config, parse_data_spec(args.data) if args.data else {})
    label = args.model or cfg.search.model[0]
    problem = None if label in cfg.search.model else check_model_name(label)
    if problem:
        raise BadArgument(f"--model {label}: {problem}")
    if args.steps < 20:
        raise BadArgument(f"--steps {args.steps}: too few to read a trend from; use 100 or more")
    check_pretrained_weights(cfg, label)
    from pneumo_ray import lr_find  # after the checks: imports torch

    splits = load_sweep_splits(cfg)
    result = lr_find.range_test(cfg, splits, label, steps=args.steps)
    out = Path(args.out or f"lr_find_{label}.png")
    lr_find.plot(result, out)
    print(lr_find.summary(result, splits, out))
    return 0


def outputs_line(exp_uri: str) -> str:
    """The outputs the experiment folder holds now: a sweep that failed names only what it did write."""
    from pneumo_ray import layout, storage

    notes = {layout.REPORT_FILE: f"{layout.REPORT_FILE} (open it in a browser)",
             layout.LEADERBOARD_MD: f"{layout.LEADERBOARD_MD}/.csv/.json",
             layout.EVALUATION_FILE: layout.EVALUATION_FILE, layout.PREDICTIONS_FILE: layout.PREDICTIONS_FILE,
             layout.BEST_DIR: f"{layout.BEST_DIR}/", layout.OPTUNA_FILE: layout.OPTUNA_FILE,
             layout.TRAIN_RUNS: f"{layout.TRAIN_RUNS}/"}
    present = [note for name, note in notes.items() if storage.exists(storage.join(exp_uri, name))]
    present.append("trial folders (tensorboard --logdir)")
    return f"Outputs in {exp_uri}: {', '.join(present)}"


@contextlib.contextmanager
def reading_experiment(where: str):
    """A broken or foreign experiment folder (a truncated model.pt, hand-edited JSON, a folder of something
    else) ends in one line naming it, not in a traceback from deep inside the reader."""
    import pickle
    import zipfile

    import yaml

    from pneumo_ray.errors import BadArgument

    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, yaml.YAMLError) as err:
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise BadArgument(f"{where}: not a readable pneumo-ray experiment ({type(err).__name__}: {detail}); check "
                          "the path, or that its sweep finished and its files are intact") from None


def experiment_location(arg: str) -> str:
    from pneumo_ray import storage

    return arg if storage.is_remote(arg) else str(Path(arg).resolve())


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from pneumo_ray import storage
    from pneumo_ray.errors import BadArgument
    from pneumo_ray.layout import LEADERBOARD_MD

    path = storage.join(experiment_location(args.experiment), LEADERBOARD_MD)
    if not storage.exists(path):
        raise BadArgument(f"{path}: no leaderboard here; pass an experiment folder whose sweep has finished")
    with reading_experiment(path):
        print(storage.read_text(path))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pneumo_ray import config, manifest, storage
    from pneumo_ray.errors import BadArgument
    from pneumo_ray.layout import LEADERBOARD_JSON, LEADERBOARD_MD
    from pneumo_ray.sweep import finish, load_sweep_splits

    where = experiment_location(args.experiment)
    if not storage.exists(storage.join(where, LEADERBOARD_JSON)):
        raise BadArgument(f"{where}: no finished sweep here ({LEADERBOARD_JSON} missing); finish it with "
                          "`python sweeps/run.py --resume --storage DIR --name NAME`, or check the path")
    saved = storage.join(where, CONFIG_FILE)
    with reading_experiment(where):
        cfg = manifest.as_started(config.loads(storage.read_text(saved), saved), where)
        splits = load_sweep_splits(cfg)  # the same data the sweep used (checked like a sweep's)
        finish(storage.mirror(where), where, cfg, splits)
    print(storage.read_text(storage.join(where, LEADERBOARD_MD)))
    print(f"Report: {storage.join(where, REPORT_FILE)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumo_ray import predict

    with reading_experiment(args.experiment):
        lines, errors = predict.run(Path(args.experiment).expanduser(), args.images, rank=args.rank,
                                    ensemble=args.ensemble, cam_dir=Path(args.cam).expanduser() if args.cam else None)
    print("\n".join(lines), flush=True)
    for error in errors:
        print(f"pneumo-ray: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT if errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from pneumo_ray import export

    with reading_experiment(args.experiment):
        model, spec = export.export(Path(args.experiment).expanduser(), args.format, Path(args.out).expanduser(),
                                    rank=args.rank, ensemble=args.ensemble)
    threshold = json.loads(spec.read_text())["threshold"]
    print(f"Wrote {model} and {spec.name}: input uint8 images as {spec.name} says, output p_pneumonia; "
          f"pneumonia if p_pneumonia >= {threshold:.4f}")
    return 0


def show_progress() -> None:
    """The library reports progress and warnings through logging; a command shows them on stdout, beside
    its results. Replaces the handler an earlier call in this process set, so nothing prints twice."""
    logger = logging.getLogger("pneumo_ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[pneumo-ray] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    from pneumo_ray.errors import UserError

    args = build_parser().parse_args(argv)
    show_progress()
    try:
        commands = {"sweep": cmd_sweep, "leaderboard": cmd_leaderboard, "report": cmd_report, "predict": cmd_predict,
                    "lr-find": cmd_lr_find, "export": cmd_export,
                    "validate": cmd_validate}
        return commands[args.command](args)
    except UserError as err:
        print(f"pneumo-ray: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
