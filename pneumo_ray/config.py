"""The one config tree: dataclasses, loaded from a YAML file plus command-line overrides.

The driver loads it once: every path is made absolute against the directory the user ran from, and
every field is checked (``validation.py``) before Ray starts. The tree then travels as it is to every
Ray process of the sweep. ``docs/config.md`` describes each field.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumo_ray.errors import ConfigError
from pneumo_ray.validation import validate


@dataclass
class ExperimentConfig:
    name: str = "pneumo"
    storage: str = "./results"
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "medmnist"
    size: int = 28
    root: str = "~/.medmnist"  # medmnist: folder holding pneumoniamnist[_SIZE].npz
    path: str | None = None  # npz file, or folder root of the Kaggle layout
    # folder: decoded, resized images, keyed by the folder's content and the size, so the next sweep skips
    # decoding (null: decode every time). Never the source of truth.
    cache_dir: str | None = "~/.cache/pneumo-ray"
    resize: str = "stretch"  # folder: non-square to square: stretch, crop (centred square) or pad (black bands)
    min_val_images: int = 50  # folder: a val split smaller than this is carved from train
    val_fraction: float = 0.1
    # patient: a carved val split and CV folds keep each patient's images together (patients read from Kermany's
    # file names), since a patient on both sides makes val easier than an unseen test set. image: each image alone.
    split_by: str = "patient"
    synthetic_train: int = 512
    synthetic_val: int = 128
    synthetic_test: int = 128
    # K >= 2: pool train + val into K stratified folds; each trial trains K fold-models, is selected on their mean
    # val metric, its threshold and temperature on their out-of-fold predictions. 0: select on the val split.
    cv_folds: int = 0


@dataclass
class AugmentConfig:
    rotation_deg: float = 10.0
    hflip: bool = True
    crop: str = "pad"  # pad: shift by up to crop_padding px; resized: zoom in by up to 1-crop_scale
    crop_padding: int = 2
    crop_scale: float = 0.85
    shear_deg: float = 0.0  # random x-shear, ± degrees (Keras' shear_range)
    zoom: float = 0.0  # random zoom in or out, x 1 ± zoom (Keras' zoom_range, one factor for both axes)
    brightness: float = 0.0  # brightness jitter, x 1 ± brightness (torchvision's ColorJitter)
    contrast: float = 0.0  # contrast jitter, 1 ± contrast
    # train (the train split's mean, std), imagenet, half (0.5, 0.5) or none; true/false (older configs): train/none
    normalize: bool | str = "train"

    def __post_init__(self):
        if isinstance(self.normalize, bool):
            self.normalize = "train" if self.normalize else "none"


@dataclass
class ModelConfig:
    pretrained: bool = False
    weights_file: str | None = None  # offline pretrained weights for timm models
    head_dropout: float = 0.2
    head_warmup_epochs: int = 0  # two-stage fine-tuning: train only the head first
    finetune_lr_factor: float = 1.0  # the body trains at lr x this (after any head warm-up): a lower LR in stage two
    freeze_bn: bool = False  # every BatchNorm layer stays in eval mode: pretrained statistics are kept
    init: str = "default"  # scratch models: each layer's own init, or xavier_uniform (weights; biases zero)
    head_hidden: list = field(default_factory=list)  # timm models: hidden widths of a new MLP head, e.g. [512, 128]


@dataclass
class TrainConfig:
    epochs: int = 10
    warmup_epochs: int = 1
    schedule: str = "cosine"  # after warm-up: cosine, constant, step or plateau (pneumo_ray/schedule.py)
    min_lr: float = 0.0
    step_epochs: int = 10
    gamma: float = 0.1
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    # End a trial once `monitor` has not improved for this many epochs (null: off); its best epoch is kept.
    early_stopping_patience: int | None = None  # separate from ASHA, which compares trials; both can be on
    min_delta: float = 0.0  # a smaller change of `monitor` is no improvement (plateau and early stopping)
    monitor: str | None = None  # the val metric they watch; null: search.metric
    grad_clip: float = 1.0  # 0 turns it off
    label_smoothing: float = 0.0  # cross-entropy's: the target puts this much weight evenly on both classes
    amp: bool = True  # used only where the device supports it (CUDA)
    eval_batch_size: int = 512


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass
class SearchConfig:
    """Each dimension is a list of choices; lr and weight_decay are [low, high] log ranges. A dimension with one
    value is fixed. freeze_depth is searched only for pretrained models (it means nothing from scratch)."""

    model: list = field(default_factory=lambda: ["cnn_bn"])
    optimizer: list = field(default_factory=lambda: ["adamw", "sgd"])
    lr: list = field(default_factory=lambda: [1e-4, 1e-2])
    weight_decay: list = field(default_factory=lambda: [1e-6, 1e-3])
    batch_size: list = field(default_factory=lambda: [64, 128])
    class_weighting: list = field(default_factory=lambda: ["none", "loss", "sampler"])
    freeze_depth: list = field(default_factory=lambda: [0])
    # Optional dimensions, searched like the ones above when given two or more values; empty keeps the fixed
    # value (model.head_dropout, train.label_smoothing, augment.rotation_deg, augment.crop_scale,
    # train.epochs) for every trial.
    head_dropout: list = field(default_factory=list)
    label_smoothing: list = field(default_factory=list)
    rotation_deg: list = field(default_factory=list)
    crop_scale: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    num_samples: int = 8
    max_concurrent_trials: int = 2
    metric: str = "val_auc"
    # Optuna sampler: tpe (model-based), random (the baseline it should beat), or grid (every listed value of
    # every searched dimension, each combination once; lr and weight_decay then list values, not a range).
    sampler: str = "tpe"
    startup_trials: int = 5  # TPE's random start-up trials (Optuna's default, 10, is most of a 16-trial sweep)
    # Start-up trials take each choice's values evenly, not at random (five random trials can all draw one
    # optimizer, and TPE then rarely tries the other); lr and weight decay stay random. Only with sampler: tpe.
    stratified_start: bool = True
    time_budget_s: float | None = None  # stop starting/running trials after this long; the leaderboard still runs
    asha: AshaConfig = field(default_factory=AshaConfig)
    optuna_storage: str | None = None  # SQLAlchemy URL; default: sqlite file in the experiment folder
    initial_points: list = field(default_factory=list)  # configs to try first (e.g. a notebook's best), partial ok


@dataclass
class ResourcesConfig:
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | str = "auto"  # auto: 1 when the cluster has GPUs, else 0; 0.25 packs 4 trials a GPU
    max_failures: int = 2  # worker-group restarts per trial, resumed from the last checkpoint
    worker_start_timeout_s: int = 600  # a restarted trial may wait this long for room (a lost node, autoscaling)
    # train: each trial is a Ray Train TorchTrainer run (DDP, worker restarts). inline: a 1-worker trial trains in
    # its own Tune trial process, which skips Train's processes and so starts far sooner; Tune retries it.
    launcher: str = "train"


@dataclass
class LeaderboardConfig:
    """How the kept trials are judged on the test split, once, after the search."""

    top_k: int = 3
    # The decision threshold, chosen on val. youden: maximise sensitivity + specificity. sensitivity: the
    # highest threshold whose val sensitivity is >= min_sensitivity (a screening tool's operating point).
    threshold: str = "youden"
    min_sensitivity: float = 0.95
    bootstrap_resamples: int = 1000  # stratified bootstrap of the test split for 95% confidence intervals
    ensemble: bool = True  # add a row for the mean probability of the top-k
    temperature_scaling: bool = False  # calibrate each model's probabilities with a temperature fitted on val
    flip_tta: bool = False  # test-time augmentation: average each image's logits with its mirror image's
    gradcam_images: int = 8  # report: Grad-CAM overlays for this many sampled and this many misclassified images
    # N: after the search, train each top_k configuration N more times with new seeds (side by side, as Ray
    # trials); rank on the mean val metric over its runs and show test mean and sd over them. null: off.
    repeats: int | None = None


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # an MLflow server (http://...), a database (sqlite:///...) or a folder; null: off
    experiment: str | None = None  # the MLflow experiment the trials are logged under; null: experiment.name


@dataclass
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # needs pip install 'pneumo-ray[mlflow]'


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # Per-model settings, by search.model entry: {label: {arch, freeze_depth, size, any `model` field}}. A label
    # trains as `model` with these fields changed, so one sweep can rank scratch and pretrained variants.
    models: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def experiment_uri(self) -> str:
        """The experiment's folder, or its cloud URI (s3://bucket/prefix/name)."""
        from pneumo_ray.storage import experiment_uri

        return experiment_uri(self.experiment.storage, self.experiment.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- parsing


def _build(cls, raw: Any, where: str):
    """Turn a nested dict into dataclass ``cls``, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; known fields are {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, path)
    return cls(**kwargs)


def _model_entry(raw: Any, path: str) -> dict:
    """One models.<label> entry: the model section's fields it changes, typed as there, plus arch, freeze_depth
    and size."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping such as {{arch: resnet18, pretrained: true}}, got {raw!r}")
    hints = {**typing.get_type_hints(ModelConfig), "arch": str, "freeze_depth": list, "size": int}
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown field; known fields are {', '.join(sorted(hints))}")
    return {name: _coerce(hints[name], value, f"{path}.{name}") for name, value in raw.items()}


def _coerce(hint, value, path: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    members = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{path}: must not be empty")
    if len(members) > 1:  # e.g. float | str: the member that matches the YAML value's own type
        base = str if isinstance(value, str) else members[0]
    else:
        base = members[0]
    if base is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if base is dict:  # models: {label: a model section's fields, plus arch, freeze_depth and size}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {label: _model_entry(entry, f"{path}.{label}") for label, entry in value.items()}
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected text, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")  # a bug here, not user input


def from_dict(raw: dict, check: bool = True) -> Config:
    """``check=True`` (the driver): every path made absolute against this process's working directory,
    then validated. ``check=False`` builds the tree as given, for code that makes its own (tests,
    benchmarks). Never resolve paths inside a Ray process: a trial runs in a working directory of
    Tune's, where a relative path means another folder."""
    cfg = _build(Config, raw, "")
    if check:
        cfg = resolve_paths(cfg, Path.cwd())
        validate(cfg)
    return cfg


def resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with every local path (experiment.storage, data.root, data.path, data.cache_dir, model.weights_file
    and models.*.weights_file, a SQLite search.optuna_storage, a local MLflow store) absolute, relative ones taken
    from ``base``. Bucket URIs stay. Done once, in the driver, so the saved config and every Ray process agree."""
    from pneumo_ray.storage import absolute_mlflow_uri, absolute_sqlite_url, is_remote
    from pneumo_ray.storage import absolute_path as _absolute

    e, d, m, s, t = cfg.experiment, cfg.data, cfg.model, cfg.search, cfg.tracking.mlflow
    storage = e.storage if is_remote(e.storage) or not e.storage else _absolute(e.storage.removeprefix("file://"),
                                                                                 base)
    return dataclasses.replace(
        cfg,
        experiment=dataclasses.replace(e, storage=storage),
        data=dataclasses.replace(d, root=_absolute(d.root, base) if d.root else d.root,
                                 path=_absolute(d.path, base) if d.path else d.path,
                                 cache_dir=_absolute(d.cache_dir, base) if d.cache_dir else None),
        model=dataclasses.replace(m, weights_file=_absolute(m.weights_file, base) if m.weights_file else None),
        models={label: {**entry, "weights_file": _absolute(entry["weights_file"], base)} if entry.get("weights_file")
                else entry for label, entry in cfg.models.items()},
        search=dataclasses.replace(s, optuna_storage=absolute_sqlite_url(s.optuna_storage, base)
                                   if s.optuna_storage else None),
        tracking=TrackingConfig(dataclasses.replace(t, tracking_uri=absolute_mlflow_uri(t.tracking_uri, base))),
    )



def load(path: str | Path, overrides: dict | None = None) -> Config:
    """Load a YAML sweep config, apply dotted overrides ({"search.num_samples": 4}), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML file with --config")
    return loads(path.read_text(), str(path), overrides)


def loads(text: str, source: str, overrides: dict | None = None) -> Config:
    """``load`` for YAML text already read (``source`` names it in errors)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(raw)

