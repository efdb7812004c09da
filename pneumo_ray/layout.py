"""The experiment folder's layout: every file and folder name an experiment has, in one place.

    <storage>/<name>/
        pneumo_config.yaml          the resolved config; --resume reruns exactly this
        manifest.json               the data's identity, and per session: command, versions, git commit, nodes
        optuna.db                   the Optuna study, unless search.optuna_storage names a database
        experiment_state-*.json     Tune's saved state (which trials ran, and how they ended)
        searcher-state-*.pkl        OptunaSearch's saved state, read on --resume
        tune_trial_<id>_*/          a Tune trial: result.json, error.txt, TensorBoard events, and an
                                    inline trial's checkpoint_*/
        train_runs/<id>/            a TorchTrainer trial's Ray Train run: checkpoint_*/, DIVERGED
        leaderboard.{md,csv,json}, evaluation.json, predictions.npz, MODEL_CARD.md, report.html
        best/rank<N>_<id>/          the leaderboard's copy of each ranked trial's checkpoint
        repeats/                    leaderboard.repeats: a Tune run of its own (tune_trial_*/, train_runs/)

A checkpoint folder holds model.pt, train_state.pt and meta.json; with data.cv_folds: K, meta.json (the
fold mean's metrics) and fold_0/ .. fold_<K-1>/, each holding one fold-model's three files. Nothing here
imports torch or Ray, so every process can know the names.
"""

from __future__ import annotations

CONFIG_FILE = "pneumo_config.yaml"
MANIFEST_FILE = "manifest.json"
OPTUNA_FILE = "optuna.db"
TUNE_STATE_GLOB = "experiment_state-*.json"  # named by session start time, so they sort
SEARCHER_STATE_GLOB = "searcher-state-*.pkl"
TRIAL_RESULT_FILE = "result.json"  # one JSON line per reported epoch
TRIAL_ERROR_FILE = "error.txt"
TRAIN_RUNS = "train_runs"
DIVERGED_FILE = "DIVERGED"  # written by a trial whose loss became NaN/inf: its reason
CHECKPOINT_GLOB = "checkpoint_*"

# Inside a checkpoint folder.
MODEL_FILE = "model.pt"  # weights only: what the leaderboard and predict load
STATE_FILE = "train_state.pt"  # optimizer, scheduler, scaler and RNG state: what a retried trial resumes from
META_FILE = "meta.json"  # model name, hyperparameters, normalisation, this epoch's metrics


def fold_dir_name(fold: int) -> str:
    """The sub-folder of a cross-validated checkpoint that holds fold-model ``fold``."""
    return f"fold_{fold}"


# What the leaderboard step writes (a cloud experiment gets these uploaded back).
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
EVALUATION_FILE = "evaluation.json"  # leaderboard settings, confusion matrices and per-class reports, per row
PREDICTIONS_FILE = "predictions.npz"  # val/test labels and each leaderboard row's probabilities
REPORT_FILE = "report.html"
MODEL_CARD_FILE = "MODEL_CARD.md"
BEST_DIR = "best"
REPEATS_DIR = "repeats"  # leaderboard.repeats: the re-trained top configurations, a Tune run of their own
LEADERBOARD_OUTPUTS = [LEADERBOARD_JSON, LEADERBOARD_CSV, LEADERBOARD_MD, EVALUATION_FILE, PREDICTIONS_FILE,
                       MODEL_CARD_FILE, REPORT_FILE, BEST_DIR]


def default_study_url(exp_dir: str) -> str:
    """The Optuna study when search.optuna_storage is not set: SQLite in a local experiment folder."""
    return f"sqlite:///{exp_dir.rstrip('/')}/{OPTUNA_FILE}"


def best_copy_name(rank: int, trial_id: str) -> str:
    return f"rank{rank}_{trial_id}"
