"""The Optuna sampler a sweep builds from its config: TPE's random start-up phase is as long as
search.startup_trials says, and both samplers follow experiment.seed."""

from __future__ import annotations

import optuna
import pytest

from pneumo_ray import config
from pneumo_ray.sweep import make_sampler


def suggested_lrs(sampler, trials: int) -> list[float]:
    """Run a study on a 1-D objective and return the lr each trial was given, in order."""
    study = optuna.create_study(sampler=sampler, direction="maximize")
    study.optimize(lambda t: -abs(t.suggest_float("lr", 1e-4, 1e-1, log=True) - 3e-3), n_trials=trials)
    return [t.params["lr"] for t in study.trials]


@pytest.mark.parametrize("startup", [3, 5])
def test_tpe_samples_at_random_for_exactly_the_startup_trials(startup):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {"startup_trials": startup}})
    tpe = suggested_lrs(make_sampler(cfg), startup + 3)
    random = suggested_lrs(optuna.samplers.RandomSampler(seed=cfg.experiment.seed), startup + 3)
    assert tpe[:startup] == random[:startup]  # TPE's start-up phase is its seeded random sampler
    assert tpe[startup:] != random[startup:]  # then the model picks
    assert suggested_lrs(make_sampler(cfg), startup + 3) == tpe  # the same seed repeats the search


def test_random_sampler_is_the_seeded_baseline():
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {"sampler": "random"}})
    assert suggested_lrs(make_sampler(cfg), 6) == suggested_lrs(optuna.samplers.RandomSampler(seed=0), 6)
