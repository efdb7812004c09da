"""What a valid config is: every field's checks, and the values each one may take.

``config.from_dict`` runs ``validate`` on every tree the driver loads, before Ray starts, so that a
typo costs a one-line error instead of a half-finished sweep. Errors name the field (``search.lr``)
and say how to fix it. This module reads the tree but does not import it, so ``config`` can import it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pneumo_ray.credentials import clear_text_password
from pneumo_ray.errors import ConfigError
from pneumo_ray.model_settings import freeze_dimensions, loaded_size, model_variant, own_size

if TYPE_CHECKING:
    from pneumo_ray.config import Config

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("cosine", "constant", "step", "plateau")  # schedule.py
SAMPLERS = ("tpe", "random", "grid")
LAUNCHERS = ("train", "inline")
CLASS_WEIGHTING = ("none", "loss", "sampler")
DATA_SOURCES = ("medmnist", "npz", "folder", "synthetic")
MEDMNIST_SIZES = (28, 64, 128, 224)
CROP_MODES = ("none", "pad", "resized")
NORMALIZATIONS = ("train", "imagenet", "half", "none")  # augment.py
RESIZE_RULES = ("stretch", "crop", "pad")  # images.read_gray
SPLIT_RULES = ("patient", "image")  # data.py: what a carved val split and CV folds keep together
THRESHOLD_RULES = ("youden", "sensitivity")
SELECTION_METRICS = ("val_auc", "val_acc", "val_balanced_acc", "val_f1", "val_loss")
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# [low, high] log ranges (with sampler: grid, lists of values); every other searched dimension is a list of choices
RANGES = ("lr", "weight_decay")
# Optional search dimensions -> the (section, field) each one sets for its trial when searched.
OPTIONAL_DIMENSIONS = {"head_dropout": ("model", "head_dropout"), "label_smoothing": ("train", "label_smoothing"),
                       "rotation_deg": ("augment", "rotation_deg"), "crop_scale": ("augment", "crop_scale"),
                       "epochs": ("train", "epochs")}


def conditional_dimensions(cfg: Config) -> set[str]:
    """The searched dimensions that only some of the sweep's models have (freeze depths)."""
    searched = set(searched_dimensions(cfg))
    return {name for name, (_, labels) in freeze_dimensions(cfg).items()
            if name in searched and labels != set(cfg.search.model)}


def selection_mode(metric: str) -> str:
    """Whether the selection metric is better high (``max``) or low (``min``, a loss)."""
    return "min" if metric.endswith("loss") else "max"


def searched_dimensions(cfg: Config) -> list[str]:
    """The dimensions with more than one value: what the search explores."""
    s = cfg.search
    dims = [name for name in ("model", "optimizer", "batch_size", "class_weighting") if len(set(getattr(s, name))) > 1]
    if s.sampler == "grid":
        dims += [name for name in RANGES if len(set(getattr(s, name))) > 1]
    else:
        dims += [name for name in RANGES if getattr(s, name)[0] != getattr(s, name)[-1]]
    dims += [name for name, (depths, _) in freeze_dimensions(cfg).items() if len(set(depths)) > 1]
    dims += [name for name in OPTIONAL_DIMENSIONS if len(set(getattr(s, name))) > 1]
    return dims


def grid_axes(cfg: Config) -> dict[str, list]:
    """sampler: grid: each searched dimension's distinct values, in the config's order. The grid is their
    product; the others are fixed, as with every sampler."""
    s, freeze = cfg.search, freeze_dimensions(cfg)
    return {name: [float(v) if name in RANGES else v
                   for v in dict.fromkeys(freeze[name][0] if name in freeze else getattr(s, name))]
            for name in searched_dimensions(cfg)}


def trial_epochs(cfg: Config) -> list[int]:
    """Every epoch count a trial may train for: search.epochs, or train.epochs."""
    return list(cfg.search.epochs) or [cfg.train.epochs]


def _check(ok: bool, path: str, message: str):
    if not ok:
        raise ConfigError(f"{path}: {message}")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choices(values: list, allowed, path: str):
    _check(len(values) > 0, path, "needs at least one value")
    for v in values:
        _check(v in allowed, path, f"unknown value {v!r}; choose from {', '.join(map(str, allowed))}")


def _check_log_range(values: list, path: str, grid: bool):
    if grid:  # each value is a grid point
        _check(len(values) >= 1, path, "with sampler: grid, list the values to try, e.g. [1.0e-4, 1.0e-3, 1.0e-2]")
    else:
        _check(len(values) in (1, 2), path, "expected one value or a [low, high] range (or sampler: grid, "
                                            "which takes a list of values)")
    # Weight decay may be 0 where nothing is drawn on a log scale: fixed ([0]: none, as several studies), or a grid.
    zero_ok = path == "search.weight_decay" and (grid or values == [0])
    for v in values:
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or (zero_ok and v == 0)), path,
               f"values must be positive numbers (searched on a log scale), got {v!r}"
               + ("; [0] turns weight decay off" if path == "search.weight_decay" else ""))
    _check(grid or values[0] <= values[-1], path, f"low {values[0]} is above high {values[-1]}")


def validate(cfg: Config) -> None:
    """Every section's checks, in the YAML's order; the first problem raises a ConfigError."""
    for check in (_validate_experiment, _validate_data, _validate_augment, _validate_model_and_train,
                  _validate_models, _validate_search, _validate_resources, _validate_leaderboard):
        check(cfg)


def _validate_experiment(cfg: Config) -> None:
    from pneumo_ray.storage import is_remote

    e = cfg.experiment
    _check(bool(EXPERIMENT_NAME.match(e.name)) and ".." not in e.name, "experiment.name",
           f"{e.name!r} must be letters, digits, '.', '_' or '-' (no path separators, no '..')")
    _check(bool(e.storage), "experiment.storage", "must name a folder or a cloud URI (s3://bucket/prefix)")
    _check(not clear_text_password(e.storage), "experiment.storage",
           "holds a secret key in the URI, which the experiment would keep; give the bucket's credentials by "
           "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the cloud's own login instead")
    if is_remote(e.storage):
        _check(bool(cfg.search.optuna_storage), "search.optuna_storage",
               f"a cloud experiment.storage ({e.storage}) needs the Optuna study in a database that every run can "
               "reach: set a URL such as postgresql://user@host/optuna")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _check_choices([d.source], DATA_SOURCES, "data.source")
    if d.source == "medmnist":
        _check(d.size in MEDMNIST_SIZES, "data.size", f"PneumoniaMNIST comes in {MEDMNIST_SIZES}, got {d.size}")
    _check(8 <= d.size <= 1024, "data.size", f"image side in pixels must be 8..1024, got {d.size}")
    if d.source in ("npz", "folder"):
        _check(bool(d.path), "data.path", f"source {d.source!r} needs a path (or use --data {d.source}:PATH)")
    _check(0 < d.val_fraction < 0.5, "data.val_fraction", "must be between 0 and 0.5")
    _check_choices([d.resize], RESIZE_RULES, "data.resize")
    _check_choices([d.split_by], SPLIT_RULES, "data.split_by")
    _check(_whole(d.cv_folds) and (d.cv_folds == 0 or d.cv_folds >= 2), "data.cv_folds",
           f"must be 0 (off) or a number of folds >= 2, such as 5; got {d.cv_folds!r}")
    _check(d.cv_folds == 0 or cfg.resources.launcher == "train", "data.cv_folds",
           "folds train side by side as Ray Train workers: set resources.launcher: train, or data.cv_folds: 0")
    for name in ("synthetic_train", "synthetic_val", "synthetic_test"):
        _check(getattr(d, name) >= 8, f"data.{name}", "needs at least 8 images")


def _validate_augment(cfg: Config) -> None:
    a = cfg.augment
    _check(0 <= a.rotation_deg <= 180, "augment.rotation_deg", "must be in 0..180 degrees")
    _check_choices([a.crop], CROP_MODES, "augment.crop")
    _check(a.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
    _check(0.3 <= a.crop_scale <= 1, "augment.crop_scale", "must be in 0.3..1")
    _check(0 <= a.shear_deg < 90, "augment.shear_deg", "must be in 0..90 degrees (e.g. 10)")
    for name in ("zoom", "brightness", "contrast"):
        _check(0 <= getattr(a, name) < 1, f"augment.{name}", "must be in [0, 1): the factor is drawn from 1 ± it")
    _check_choices([a.normalize], NORMALIZATIONS, "augment.normalize")


def _check_model_section(m, path: str, fewest_epochs: int) -> None:
    """The checks of a model section: ``model``, or one search.model entry's under ``models.<label>``."""
    _check(0 <= m.head_dropout < 1, f"{path}.head_dropout", "must be in [0, 1)")
    _check(m.head_warmup_epochs >= 0, f"{path}.head_warmup_epochs", "must be >= 0")
    _check(m.head_warmup_epochs < fewest_epochs, f"{path}.head_warmup_epochs", "must be below every trial's epochs")
    _check(0 < m.finetune_lr_factor <= 1, f"{path}.finetune_lr_factor", "must be in (0, 1], e.g. 0.1")
    _check_choices([m.init], ("default", "xavier_uniform"), f"{path}.init")
    _check(m.init == "default" or not m.pretrained, f"{path}.init",
           "re-initialising would discard the pretrained weights; use default with pretrained: true")
    for width in m.head_hidden:
        _check(_whole(width) and width >= 1, f"{path}.head_hidden", f"widths are whole numbers >= 1, got {width!r}")
    if m.weights_file:
        _check(m.pretrained, f"{path}.weights_file", "is only used with pretrained: true")
        _check(Path(m.weights_file).expanduser().is_file(), f"{path}.weights_file",
               f"{m.weights_file} not found; point it at a local timm weights file (.safetensors/.pth)")


def _validate_model_and_train(cfg: Config) -> None:
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", "must be >= 1")
    # the fewest epochs a trial may train; bad search.epochs values are reported by the search's checks
    fewest = min((e for e in trial_epochs(cfg) if _whole(e) and e >= 1), default=t.epochs)
    _check_model_section(cfg.model, "model", fewest)
    _check(0 <= t.warmup_epochs < fewest, "train.warmup_epochs", "must be >= 0 and below every trial's epochs")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 turns clipping off)")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check_choices([t.schedule], SCHEDULES, "train.schedule")
    _check(t.min_lr >= 0, "train.min_lr", "must be >= 0 (the LR cosine ends at)")
    _check(_whole(t.step_epochs) and t.step_epochs >= 1, "train.step_epochs", "must be a whole number >= 1")
    _check(0 < t.gamma <= 1, "train.gamma", "must be in (0, 1]: the step schedule's factor")
    _check(0 < t.plateau_factor < 1, "train.plateau_factor", "must be in (0, 1): the plateau schedule's factor")
    _check(_whole(t.plateau_patience) and t.plateau_patience >= 0, "train.plateau_patience",
           "must be a whole number >= 0 (epochs without improvement before the LR is cut)")
    _check(t.early_stopping_patience is None or (_whole(t.early_stopping_patience) and t.early_stopping_patience >= 1),
           "train.early_stopping_patience", "must be a whole number >= 1 (epochs without improvement), or null (off)")
    _check(t.min_delta >= 0, "train.min_delta", "must be >= 0")
    _check(t.monitor is None or t.monitor in SELECTION_METRICS, "train.monitor",
           f"must be one of {', '.join(SELECTION_METRICS)}, or null (search.metric)")


def _validate_models(cfg: Config) -> None:
    from pneumo_ray.models import BASELINES, STUDY_NETWORKS

    fewest = min((e for e in trial_epochs(cfg) if _whole(e) and e >= 1), default=cfg.train.epochs)
    for label, settings in cfg.models.items():
        path = f"models.{label}"
        _check(label in cfg.search.model, path, f"is not in search.model ({', '.join(map(str, cfg.search.model))}); "
                                                "add it there, or remove this entry")
        _check(isinstance(settings, dict), path, "expected a mapping such as {arch: resnet18, pretrained: true}")
        _check(isinstance(settings.get("arch", ""), str), f"{path}.arch", "expected a model name such as resnet18")
        arch, model, depths = model_variant(cfg, label)
        _check_model_section(model, path, fewest)
        _check(not model.head_hidden or arch not in BASELINES + STUDY_NETWORKS, f"{path}.head_hidden",
               f"a new head is for timm models; {arch} has its own")
        for k in depths:
            _check(_whole(k) and k >= 0, f"{path}.freeze_depth", f"freeze depths are whole numbers >= 0, got {k!r}")
        _check(model.pretrained or "freeze_depth" not in settings, f"{path}.freeze_depth",
               "freezing only makes sense for pretrained weights; set pretrained: true here or remove it")
        _check(8 <= (own_size(cfg, label) or cfg.data.size) <= 1024, f"{path}.size",
               "image side in pixels must be 8..1024")
    if cfg.data.source == "medmnist" and cfg.models:
        _check(loaded_size(cfg) in MEDMNIST_SIZES, "models", f"the largest size, {loaded_size(cfg)} px, is what "
               f"PneumoniaMNIST is loaded at: it must be one of {MEDMNIST_SIZES}")


def _validate_search(cfg: Config) -> None:
    from pneumo_ray.models import check_model_name  # lazy: keeps config importable without torch

    s = cfg.search
    _check(len(s.model) > 0, "search.model", "needs at least one model name")
    for name in s.model:
        _check(isinstance(name, str), "search.model", f"model names are text, got {name!r}")
        arch = (cfg.models.get(name) or {}).get("arch") or name  # a label with its own architecture
        problem = check_model_name(arch)
        _check(problem is None, f"models.{name}.arch" if arch != name else "search.model", problem or "")
    _check_choices(s.optimizer, OPTIMIZERS, "search.optimizer")
    if s.optuna_storage:
        _check(not clear_text_password(s.optuna_storage), "search.optuna_storage",
               "holds a password in clear text, which the experiment would keep; name an environment variable "
               "instead, e.g. postgresql://user:${OPTUNA_DB_PASSWORD}@host/optuna, and export it")
    _check_choices([s.sampler], SAMPLERS, "search.sampler")
    _check_log_range(s.lr, "search.lr", s.sampler == "grid")
    _check_log_range(s.weight_decay, "search.weight_decay", s.sampler == "grid")
    _check(len(s.batch_size) > 0, "search.batch_size", "needs at least one value")
    for b in s.batch_size:
        _check(isinstance(b, int) and not isinstance(b, bool) and b >= 2, "search.batch_size",
               f"batch sizes are whole numbers >= 2, got {b!r}")
    _check_choices(s.class_weighting, CLASS_WEIGHTING, "search.class_weighting")
    for k in s.freeze_depth:
        _check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, "search.freeze_depth",
               f"freeze depths are whole numbers >= 0, got {k!r}")
    _check(len(s.freeze_depth) > 0, "search.freeze_depth", "needs at least one value (0 = train everything)")
    if "freeze_depth" not in freeze_dimensions(cfg):  # no pretrained model takes search.freeze_depth
        _check(s.freeze_depth == [0], "search.freeze_depth",
               "freezing only makes sense for pretrained weights; set model.pretrained: true or use [0]")
    for name, (low, high, whole) in {"head_dropout": (0, 0.99, False), "label_smoothing": (0, 0.99, False),
                                     "rotation_deg": (0, 180, False), "crop_scale": (0.3, 1, False),
                                     "epochs": (1, 10_000, True)}.items():
        for v in getattr(s, name):
            _check((_whole(v) if whole else _number(v)) and low <= v <= high, f"search.{name}",
                   f"values must be {'whole numbers' if whole else 'numbers'} in {low}..{high}, got {v!r}")
    _check(s.num_samples >= 1, "search.num_samples", "must be >= 1")
    _check(s.max_concurrent_trials >= 1, "search.max_concurrent_trials", "must be >= 1")
    _check(s.time_budget_s is None or (isinstance(s.time_budget_s, (int, float)) and s.time_budget_s > 0),
           "search.time_budget_s", "must be a number of seconds > 0, or null for no limit")
    _check_choices([s.metric], SELECTION_METRICS, "search.metric")
    _check(s.startup_trials >= 1, "search.startup_trials", "must be >= 1")
    _check(s.asha.grace_period >= 1, "search.asha.grace_period", "must be >= 1")
    _check(s.asha.reduction_factor >= 2, "search.asha.reduction_factor", "must be >= 2")
    dims = searched_dimensions(cfg)
    _check(s.num_samples == 1 or bool(dims), "search",
           "every dimension is fixed, so there is nothing to search; give some dimension two or more values")
    if s.sampler == "grid":
        conditional = sorted(conditional_dimensions(cfg))
        _check(not conditional, "search.sampler", f"grid needs every searched dimension to apply to every model, but "
               f"{conditional[0] if conditional else ''} applies only to some (pretrained ones); give it one value, "
               "or run the grid per model")
        axes = grid_axes(cfg)
        points = math.prod(len(values) for values in axes.values())
        sizes = " x ".join(f"{name} {len(values)}" for name, values in axes.items()) or "every dimension fixed"
        _check(s.num_samples == points, "search.num_samples",
               f"sampler: grid has {points} point(s) ({sizes}); set num_samples: {points} to try each once")
        _check(not s.initial_points, "search.initial_points", "sampler: grid tries every point already; remove them")
    for i, point in enumerate(s.initial_points):
        where = f"search.initial_points[{i}]"
        _check(isinstance(point, dict), where, "expected a mapping such as {optimizer: sgd, lr: 0.01}")
        unknown = sorted(set(point) - set(dims))
        _check(not unknown, where, f"{unknown[0] if unknown else ''!r} is not a searched dimension; "
               f"searched: {', '.join(dims) or 'none'}")


def _validate_resources(cfg: Config) -> None:
    r = cfg.resources
    _check(r.workers_per_trial >= 1, "resources.workers_per_trial", "must be >= 1")
    _check(r.cpus_per_worker > 0, "resources.cpus_per_worker", "must be > 0 (fractions allowed)")
    if isinstance(r.gpus_per_worker, str):
        _check(r.gpus_per_worker == "auto", "resources.gpus_per_worker",
               f"expected auto or a number such as 0.25, got {r.gpus_per_worker!r}")
    else:
        _check(r.gpus_per_worker >= 0, "resources.gpus_per_worker", "must be >= 0 (fractions such as 0.25 allowed)")
        _check(r.gpus_per_worker <= 1 or float(r.gpus_per_worker).is_integer(), "resources.gpus_per_worker",
               "above 1 must be a whole number")
    _check(r.max_failures >= 0, "resources.max_failures", "must be >= 0")
    _check(r.worker_start_timeout_s >= 10, "resources.worker_start_timeout_s", "must be >= 10 seconds")
    _check_choices([r.launcher], LAUNCHERS, "resources.launcher")
    _check(r.launcher == "train" or r.workers_per_trial == 1, "resources.launcher",
           "inline trains one worker per trial; set resources.workers_per_trial: 1 or launcher: train for DDP")


def _validate_leaderboard(cfg: Config) -> None:
    lb = cfg.leaderboard
    _check(lb.top_k >= 1, "leaderboard.top_k", "must be >= 1")
    _check_choices([lb.threshold], THRESHOLD_RULES, "leaderboard.threshold")
    _check(0 < lb.min_sensitivity <= 1, "leaderboard.min_sensitivity", "must be in (0, 1], e.g. 0.95")
    _check(lb.bootstrap_resamples >= 1000, "leaderboard.bootstrap_resamples",
           "must be >= 1000: fewer resamples leave the 2.5% tails of a 95% interval too noisy")
    _check(lb.gradcam_images >= 0, "leaderboard.gradcam_images", "must be >= 0 (0 leaves Grad-CAM out of the report)")
    _check(lb.repeats is None or (_whole(lb.repeats) and lb.repeats >= 1), "leaderboard.repeats",
           f"must be a number of extra seeds >= 1, such as 3, or null for none; got {lb.repeats!r}")
