"""The Optuna sampler a sweep builds from its config: TPE's random start-up phase is as long as
search.startup_trials says, and both samplers follow experiment.seed."""

from __future__ import annotations

import itertools
import math
import warnings

import optuna
import pytest

from pneumo_ray import config
from pneumo_ray.search_space import DefineByRun, make_sampler, stratified_start


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


def concurrent_suggestions(sampler, trials: int, concurrent: int = 2) -> list[tuple]:
    """(optimizer, lr) of each trial of a study run ``concurrent`` trials at a time, as a sweep runs them:
    a batch is asked for before any of it is told, so a constant liar sees the others still running."""
    study = optuna.create_study(sampler=sampler, direction="maximize")
    best_lr = {"adam": 1e-3, "sgd": 3e-2}  # the interaction a multivariate model can learn
    while len(study.trials) < trials:
        batch = []
        for _ in range(concurrent):  # each trial gets its parameters as it starts, as OptunaSearch does
            t = study.ask()
            batch.append((t, t.suggest_categorical("optimizer", ["adam", "sgd"]),
                          t.suggest_float("lr", 1e-4, 1e-1, log=True)))
        for t, opt, lr in batch:
            study.tell(t, -abs(math.log10(lr / best_lr[opt])))
    return [(t.params["optimizer"], t.params["lr"]) for t in study.trials]


def test_tpe_is_multivariate_and_a_constant_liar():
    """The search the benchmarks measured: Optuna 5's defaults, which make_sampler sets explicitly because
    Optuna 3 and 4 default to neither. Each of the two changes which trials the same seed picks."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {"startup_trials": 4}})
    ours = concurrent_suggestions(make_sampler(cfg), 12)

    def tpe(**options):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=cfg.experiment.seed, n_startup_trials=4, **options)

    assert ours == concurrent_suggestions(tpe(multivariate=True, constant_liar=True), 12)
    assert ours != concurrent_suggestions(tpe(multivariate=False, constant_liar=True), 12)
    assert ours != concurrent_suggestions(tpe(multivariate=True, constant_liar=False), 12)


def test_start_up_trials_take_every_choice_evenly():
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {
        "model": ["cnn_bn", "mlp"], "optimizer": ["adamw", "sgd"], "class_weighting": ["none", "loss", "sampler"],
        "batch_size": [64], "startup_trials": 5}})
    points = stratified_start(cfg)
    assert len(points) == 5
    assert all(set(p) == {"model", "optimizer", "class_weighting"} for p in points)  # lr, wd stay random
    for name, values in (("model", ["cnn_bn", "mlp"]), ("optimizer", ["adamw", "sgd"]),
                         ("class_weighting", ["none", "loss", "sampler"])):
        counts = sorted(sum(p[name] == v for p in points) for v in values)
        assert counts == ([2, 3] if len(values) == 2 else [1, 2, 2]), (name, counts)
    assert stratified_start(cfg) == points  # seeded
    assert any(stratified_start(config.from_dict({**cfg.to_dict(), "experiment": {**cfg.to_dict()["experiment"],
                                                                                  "seed": seed}})) != points
               for seed in (1, 2, 3))


@pytest.mark.parametrize("search, expected", [
    ({"initial_points": [{"optimizer": "sgd"}, {"optimizer": "adamw", "lr": 1e-3}]}, 3),  # they count as start-up
    ({"num_samples": 2}, 2),
    ({"stratified_start": False}, 0),
    ({"sampler": "random"}, 0),  # the random baseline stays random
    ({"optimizer": ["adamw"], "batch_size": [64], "class_weighting": ["none"]}, 0),  # nothing to stratify
])
def test_stratified_start_fills_only_the_remaining_start_up_trials(search, expected):
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {"startup_trials": 5, **search}})
    assert len(stratified_start(cfg)) == expected


def test_ray_optuna_search_runs_the_stratified_start():
    """The points go through Ray Tune's OptunaSearch as the sweep passes them: each start-up trial gets
    its fixed choices, and an lr and weight decay drawn from their ranges."""
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {
        "optimizer": ["adamw", "sgd"], "batch_size": [64, 128], "class_weighting": ["none"], "startup_trials": 4}})
    points = stratified_start(cfg)
    searcher = OptunaSearch(space=DefineByRun(cfg), metric="val_auc", mode="max", points_to_evaluate=points,
                            sampler=make_sampler(cfg))
    suggested = []
    for i in range(6):
        params = searcher.suggest(f"t{i}")
        suggested.append(params)
        searcher.on_trial_complete(f"t{i}", {"val_auc": 0.9 if params["optimizer"] == "sgd" else 0.8,
                                             "training_iteration": 1})
    for point, params in zip(points, suggested):
        assert {k: params[k] for k in point} == point
        assert 1e-4 <= params["lr"] <= 1e-2 and 1e-6 <= params["weight_decay"] <= 1e-3
    assert len({round(p["lr"], 12) for p in suggested[:4]}) == 4  # drawn, not fixed
    assert sorted(p["optimizer"] for p in suggested[:4]) == ["adamw", "adamw", "sgd", "sgd"]


def grid_config(**search):
    return config.from_dict({"data": {"source": "synthetic"}, "search": {
        "sampler": "grid", "optimizer": ["adam", "sgd"], "lr": [1e-4, 1e-3, 1e-2], "weight_decay": [1e-4],
        "batch_size": [32, 64], "class_weighting": ["none"], "num_samples": 12, **search}})


def test_grid_sampler_visits_each_point_once_through_ray_optuna_search():
    """Study 002's grid as a sweep runs it: through Ray Tune's OptunaSearch, three trials asked for before any
    ends, every grid point exactly once, and the last trial's end raises nothing (Optuna's own grid sampler
    stops its study there, which only study.optimize allows)."""
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = grid_config()
    searcher = OptunaSearch(space=DefineByRun(cfg), metric="val_auc", mode="max", sampler=make_sampler(cfg))
    suggested = []
    for batch in range(4):
        ids = [f"t{batch}_{i}" for i in range(3)]
        params = [searcher.suggest(trial_id) for trial_id in ids]
        for trial_id, p in zip(ids, params):
            searcher.on_trial_complete(trial_id, {"val_auc": p["lr"] * 10, "training_iteration": 1})
        suggested += params
    points = sorted((p["optimizer"], p["lr"], p["batch_size"]) for p in suggested)
    assert points == sorted(itertools.product(["adam", "sgd"], [1e-4, 1e-3, 1e-2], [32, 64]))
    assert all(p["weight_decay"] == 1e-4 and p["class_weighting"] == "none" for p in suggested)  # fixed
    order = [(p["optimizer"], p["lr"], p["batch_size"]) for p in suggested]
    again = OptunaSearch(space=DefineByRun(cfg), metric="val_auc", mode="max", sampler=make_sampler(cfg))
    assert [tuple(again.suggest(f"r{i}")[k] for k in ("optimizer", "lr", "batch_size")) for i in range(12)] == order


def test_grid_needs_num_samples_to_match_its_points():
    with pytest.raises(config.ConfigError, match=r"search.num_samples: sampler: grid has 12 point\(s\) "
                                                 r"\(optimizer 2 x batch_size 2 x lr 3\); set num_samples: 12"):
        grid_config(num_samples=8)
    with pytest.raises(config.ConfigError, match="search.lr: low"):
        grid_config(sampler="tpe", lr=[1e-2, 1e-3], num_samples=8)  # a range elsewhere
    assert grid_config(lr=[1e-2, 1e-3, 1e-4]).search.lr == [1e-2, 1e-3, 1e-4]  # a grid lists values in any order
    assert grid_config(weight_decay=[0, 1e-4], num_samples=24).search.weight_decay == [0, 1e-4]  # no decay: a point
    fixed = config.from_dict({"data": {"source": "synthetic"}, "search": {"weight_decay": [0]}})
    assert DefineByRun(fixed)(optuna.create_study().ask())["weight_decay"] == 0.0  # off, as study 000 trained


def test_optional_dimensions_are_searched_only_when_given_and_reach_the_trial():
    from pneumo_ray.search_space import with_trial_params
    from pneumo_ray.validation import searched_dimensions

    plain = config.from_dict({"data": {"source": "synthetic"}})
    assert not {"head_dropout", "label_smoothing", "rotation_deg", "crop_scale", "epochs"} & set(
        searched_dimensions(plain))
    cfg = config.from_dict({"data": {"source": "synthetic"}, "train": {"epochs": 6},
                            "search": {"head_dropout": [0.0, 0.5], "label_smoothing": [0.1],
                                       "rotation_deg": [0, 20], "crop_scale": [0.7, 1.0], "epochs": [2, 4]}})
    assert {"head_dropout", "rotation_deg", "crop_scale", "epochs"} <= set(searched_dimensions(cfg))
    assert "label_smoothing" not in searched_dimensions(cfg)  # one value: fixed, not searched

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = {**DefineByRun(cfg)(trial), **trial.params}
        assert params["label_smoothing"] == 0.1 and params["epochs"] in (2, 4)
        mine = with_trial_params(cfg, params)
        assert (mine.model.head_dropout, mine.train.label_smoothing, mine.augment.rotation_deg,
                mine.augment.crop_scale, mine.train.epochs) == (params["head_dropout"], 0.1, params["rotation_deg"],
                                                                params["crop_scale"], params["epochs"])
        seen.add((params["head_dropout"], params["epochs"]))
        study.tell(trial, 0.5)
    assert len(seen) == 4  # every combination came up: they are real dimensions
    assert cfg.train.epochs == 6 and cfg.model.head_dropout == 0.2  # the sweep's own config is untouched
    assert with_trial_params(plain, {"lr": 1e-3}) == plain  # a trial without them trains with the fixed values


def test_per_model_settings_search_freeze_depth_only_where_it_means_something():
    """One sweep ranks a scratch and a pretrained ResNet-18 (models.<label>): each trial's config carries its
    own model's settings, and only the pretrained one searches freeze depth, over its own values."""
    from pneumo_ray.search_space import with_trial_params
    from pneumo_ray.validation import conditional_dimensions, searched_dimensions

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.from_dict({"data": {"source": "synthetic"}, "search": {"model": ["resnet18", "r18_pretrained"]},
                            "models": {"r18_pretrained": {"arch": "resnet18", "pretrained": True, "head_dropout": 0.4,
                                                          "head_hidden": [64], "freeze_depth": [0, 2]}}},
                           check=False)
    assert "r18_pretrained.freeze_depth" in searched_dimensions(cfg)
    assert conditional_dimensions(cfg) == {"r18_pretrained.freeze_depth"}
    assert "r18_pretrained.freeze_depth" not in {k for p in stratified_start(cfg) for k in p}  # not for scratch ones
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        constants = DefineByRun(cfg)(trial)
        params = {**trial.params, **constants}  # as OptunaSearch merges them
        mine = with_trial_params(cfg, params).model
        if params["model"] == "r18_pretrained":
            assert params["freeze_depth"] == params["r18_pretrained.freeze_depth"] in (0, 2)
            assert (mine.pretrained, mine.head_dropout, mine.head_hidden) == (True, 0.4, [64])
        else:
            assert params["freeze_depth"] == 0 and "r18_pretrained.freeze_depth" not in params
            assert mine == cfg.model  # the model section as written
        seen.add((params["model"], params["freeze_depth"]))
        study.tell(trial, 0.5)
    assert seen == {("resnet18", 0), ("r18_pretrained", 0), ("r18_pretrained", 2)}
