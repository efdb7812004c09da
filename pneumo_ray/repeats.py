"""leaderboard.repeats: after the search, each top configuration is trained again with new seeds.

One run's val metric is partly luck: the seed sets the initial weights, the sample order and the
augmentations (docs/selection.md). The search's top_k configurations are each trained ``repeats`` more
times, with seeds experiment.seed + 1, + 2, ..., as one more Tune run of plain trials (no search, no early
stopping), side by side as the cluster allows. It lives in ``<experiment>/repeats/``, so its trials and
Train runs never mix with the search's. The leaderboard then ranks the configurations on their mean val
(or out-of-fold) metric over all their runs, and shows each test metric's mean and sd over the runs. Only
the leaderboard reads the test split, after every run has ended.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pneumo_ray import cluster, storage
from pneumo_ray.config import Config
from pneumo_ray.layout import REPEATS_DIR

SUMMARY_METRICS = ("auc", "acc", "sensitivity", "specificity")  # test metrics shown as mean and sd over runs


def repeats_config(cfg: Config) -> Config:
    """The config the repeat trials run under: the experiment's own, with <experiment>/repeats/ as its folder."""
    return dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, storage=cfg.experiment_uri,
                                                                   name=REPEATS_DIR))


def repeat_points(exp_dir: Path, cfg: Config) -> list[dict]:
    """One trial's params per repeat: each kept configuration's, with a new seed and the trial it repeats."""
    from pneumo_ray.checkpoints import best_per_trial

    top = best_per_trial(exp_dir, cfg.search.metric)[: cfg.leaderboard.top_k]
    return [{**c["meta"]["params"], "seed": cfg.experiment.seed + r, "repeat_of": c["trial_id"]}
            for c in top for r in range(1, cfg.leaderboard.repeats + 1)]


def repeat_trial(config: dict, cfg: Config, splits_holder: dict) -> None:
    from pneumo_ray.trial import tune_trial

    tune_trial(config["point"], cfg, splits_holder)


def run_repeats(cfg: Config, splits, concurrency: int) -> bool:
    """Train the repeats, or go on with an interrupted repeat run (--resume). True when every repeat ended."""
    import ray
    from ray import tune

    from pneumo_ray.trial import inline_run_config, reuse_trial_processes

    rcfg = repeats_config(cfg)
    trainable = tune.with_parameters(repeat_trial, cfg=rcfg, splits_holder={"ref": ray.put(splits)})
    trainable = tune.with_resources(trainable, cluster.trial_resources(rcfg, ray.cluster_resources()))
    if tune.Tuner.can_restore(rcfg.experiment_uri):
        tuner = tune.Tuner.restore(rcfg.experiment_uri, trainable=trainable, resume_unfinished=True)
    else:
        points = repeat_points(storage.mirror(cfg.experiment_uri), cfg)
        tuner = tune.Tuner(trainable, param_space={"point": tune.grid_search(points)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=concurrency,
                                                       reuse_actors=reuse_trial_processes(cfg)),
                           run_config=tune.RunConfig(name=REPEATS_DIR, storage_path=cfg.experiment_uri,
                                                     **inline_run_config(cfg)))
    tuner.fit()
    statuses = [t["status"] for t in storage.saved_trials(storage.mirror(rcfg.experiment_uri))]
    return bool(statuses) and all(s in ("TERMINATED", "ERROR") for s in statuses)


def rank_on_repeats(top: list[dict], exp_dir: Path, metric: str) -> list[dict]:
    """``top`` (the search's best trials) re-ranked on the mean of ``metric`` over each trial's runs: its own
    and its repeats' (their best epochs). Each candidate gains ``repeats``: its repeats' candidates."""
    from pneumo_ray.checkpoints import best_per_trial

    by_origin: dict[str, list[dict]] = {}
    for run in best_per_trial(exp_dir / REPEATS_DIR, metric):
        by_origin.setdefault(run["meta"]["params"]["repeat_of"], []).append(run)
    sign = -1.0 if metric.endswith("loss") else 1.0
    for cand in top:
        cand["repeats"] = sorted(by_origin.get(cand["trial_id"], []), key=lambda r: r["meta"]["params"]["seed"])
        cand["runs_mean"] = float(np.mean([run_value(c, metric) for c in [cand, *cand["repeats"]]]))
    return sorted(top, key=lambda c: -sign * c["runs_mean"])


def run_value(cand: dict, metric: str) -> float:
    return cand["meta"]["metrics"][metric]


def summarize_runs(cand: dict, first_run: tuple[np.ndarray, np.ndarray], splits, cfg: Config) -> tuple[dict, dict]:
    """Mean and sd over a configuration's runs (the search's, given as its (val, test) probabilities, and
    each repeat's) of the val metric and of each test metric, every run at its own threshold chosen on val.
    Returns (the row's columns, each metric's values run by run for evaluation.json)."""
    from pneumo_ray.checkpoints import load_members
    from pneumo_ray.evaluate import kept_probabilities, selection_labels
    from pneumo_ray.metrics import binary_metrics, decision_threshold

    metric, val_y = cfg.search.metric, selection_labels(splits)
    probs = [first_run] + [kept_probabilities(load_members(r["checkpoint_dir"], r["meta"]), splits, cfg)[1:]
                           for r in cand["repeats"]]
    tests = [binary_metrics(splits.test_y, test, decision_threshold(val_y, val, cfg.leaderboard))
             for val, test in probs]
    out = {"runs": len(probs),
           "runs_seeds": [cfg.experiment.seed] + [r["meta"]["params"]["seed"] for r in cand["repeats"]]}
    values = {metric: [run_value(c, metric) for c in [cand, *cand["repeats"]]],
              **{f"test_{m}": [float(t[m]) for t in tests] for m in SUMMARY_METRICS}}
    for key, vs in values.items():
        out[f"{key}_runs_mean"], out[f"{key}_runs_sd"] = float(np.mean(vs)), float(np.std(vs, ddof=1))
    return out, {"seeds": out["runs_seeds"], **values}


def runs_table(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]] | None:
    """Mean ± sd over each configuration's runs, for leaderboard.md and the report; None without repeats."""
    ranked = [r for r in rows if r.get("runs")]
    if not ranked:
        return None
    header = ["rank", "model", "runs", f"{metric} (mean ± sd)",
              *(f"test {m} (mean ± sd)" for m in ("AUC", "accuracy", "sensitivity", "specificity"))]
    body = [[str(r["rank"]), r["model"], str(r["runs"]),
             *(f"{r[f'{key}_runs_mean']:.4f} ± {r[f'{key}_runs_sd']:.4f}"
               for key in (metric, *(f"test_{m}" for m in SUMMARY_METRICS)))] for r in ranked]
    return header, body
