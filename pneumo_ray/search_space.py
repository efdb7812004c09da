"""Config -> Optuna define-by-run search space.

Define-by-run lets a parameter exist only when it means something: freeze_depth
is suggested only for pretrained models (per search.model entry, see models.<label>),
so TPE never models a dimension that does nothing. A dimension with a single value
is returned as a constant.
"""

from __future__ import annotations

import dataclasses
import random
import warnings

import optuna

from pneumo_ray.config import Config
from pneumo_ray.model_settings import freeze_dimensions, model_variant
from pneumo_ray.validation import OPTIONAL_DIMENSIONS, RANGES, conditional_dimensions, grid_axes, searched_dimensions


class DefineByRun:
    """``space(trial) -> constants``, as OptunaSearch wants it. A class, not a closure, because
    Tune pickles the searcher (and so this) into the experiment state for ``--resume``."""

    def __init__(self, cfg: Config):
        self.cfg, self.search = cfg, cfg.search
        # A grid lists lr and weight decay values (every one a grid point), where the other samplers take a range.
        self.grid = cfg.search.sampler == "grid"

    def __call__(self, trial) -> dict:
        s, constants = self.search, {}

        def categorical(name, choices):
            if len(set(choices)) > 1:
                return trial.suggest_categorical(name, list(choices))
            constants[name] = choices[0]
            return choices[0]

        def log_range(name, bounds):
            if self.grid:
                categorical(name, [float(v) for v in bounds])
            elif bounds[0] != bounds[-1]:
                trial.suggest_float(name, float(bounds[0]), float(bounds[-1]), log=True)
            else:
                constants[name] = float(bounds[0])

        label = categorical("model", s.model)
        categorical("optimizer", s.optimizer)
        log_range("lr", s.lr)
        log_range("weight_decay", s.weight_decay)
        categorical("batch_size", s.batch_size)
        categorical("class_weighting", s.class_weighting)
        # Conditional: frozen stages mean nothing without pretrained weights. The trial always gets the
        # value as freeze_depth, whichever dimension it came from.
        for name, (depths, labels) in freeze_dimensions(self.cfg).items():
            if label in labels:
                constants["freeze_depth"] = categorical(name, depths)
        constants.setdefault("freeze_depth", 0)
        for name in OPTIONAL_DIMENSIONS:  # only those the config names; the rest keep their fixed value
            if getattr(s, name):
                categorical(name, getattr(s, name))
        return constants


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for Tune. Tune's num_samples (the grid's size, validation checks) ends the
    search, so the sampler need not: Optuna's calls study.stop() once the grid is done, which is only
    allowed inside study.optimize and so raises in OptunaSearch's ask-and-tell. The grid points go to
    trials 0..n-1 in a shuffled order, so each is visited once, however many trials run at a time."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: Config):
    """The Optuna sampler, seeded by the experiment so a sweep can be repeated.

    TPE is multivariate (it models lr together with the optimizer it suits) and a constant liar (a trial
    still running counts as a poor one, so concurrent trials are not sent to the same spot). Optuna 5
    defaults to both; Optuna 3 and 4 default to neither, and call them experimental. Said explicitly,
    so that a sweep searches the same way on every Optuna the project accepts."""
    s = cfg.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.experiment.seed)
    if s.sampler == "grid":
        return GridSampler(grid_axes(cfg), seed=cfg.experiment.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=cfg.experiment.seed, n_startup_trials=s.startup_trials,
                                          multivariate=True, constant_liar=True)


def with_trial_params(cfg: Config, params: dict) -> Config:
    """The config one trial trains with: ``cfg`` with its model's own settings (models.<label>) in the model
    section, the trial's values of the optional dimensions (head dropout, label smoothing, rotation, crop
    scale, epochs) in the fields they stand for, and a repeat's own seed (leaderboard.repeats)."""
    if params.get("model") in cfg.models:
        cfg = dataclasses.replace(cfg, model=model_variant(cfg, params["model"])[1])
    sections = {"experiment": {"seed": params["seed"]}} if "seed" in params else {}
    for name, (section, field) in OPTIONAL_DIMENSIONS.items():
        if name in params:
            sections.setdefault(section, {})[field] = params[name]
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)
                                       for section, fields in sections.items()})


def stratified_start(cfg: Config) -> list[dict]:
    """Partial points for TPE's start-up trials (those not taken by search.initial_points): each searched
    choice takes its values as evenly as the count allows (5 trials, 2 optimizers: 3 and 2), in an order
    drawn from experiment.seed; lr and weight decay are left to the sampler, which draws them at random
    during start-up. A stratified initial design, as Bayesian optimisers commonly start with; pure random
    start-up trials can all draw one value (1 in 16 for 5 trials and 2 values), and TPE then rarely leaves
    it (docs/performance.md)."""
    s = cfg.search
    count = min(s.startup_trials, s.num_samples) - len(s.initial_points)
    # Not lr and weight decay (drawn by the sampler), nor a dimension only some models have (freeze depth).
    skipped = set(RANGES) | conditional_dimensions(cfg)
    choices = [name for name in searched_dimensions(cfg) if name not in skipped]
    if s.sampler != "tpe" or not s.stratified_start or count <= 0 or not choices:
        return []
    rng = random.Random(cfg.experiment.seed)
    columns = {}
    for name in choices:
        values = list(dict.fromkeys(freeze_dimensions(cfg)[name][0] if name.endswith("freeze_depth")
                                    else getattr(s, name)))  # distinct, in the config's order
        rng.shuffle(values)  # which values get the extra trials when the count doesn't divide evenly
        column = (values * count)[:count]
        rng.shuffle(column)
        columns[name] = column
    return [{name: column[i] for name, column in columns.items()} for i in range(count)]
