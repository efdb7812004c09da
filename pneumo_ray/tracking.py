"""Optional MLflow tracking (``tracking.mlflow``): every trial as an MLflow run, and the leaderboard as one more.

Trials are logged by Ray's own ``MLflowLoggerCallback`` from the driver (parameters = the trial's searched
values, metrics = each epoch's report), so Train workers need no MLflow access. After the leaderboard, a run named
``leaderboard`` gets the leaderboard, report, model card and manifest as artifacts and rank 1's test metrics,
and each ranked trial's run is tagged with its rank. MLflow is an extra: ``pip install 'pneumo-ray[mlflow]'``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback

from pneumo_ray.config import Config, ConfigError
from pneumo_ray.layout import (
    LEADERBOARD_CSV,
    LEADERBOARD_JSON,
    LEADERBOARD_MD,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    REPORT_FILE,
)

log = logging.getLogger(__name__)

ARTIFACTS = (LEADERBOARD_MD, LEADERBOARD_CSV, LEADERBOARD_JSON, REPORT_FILE, MODEL_CARD_FILE, MANIFEST_FILE)
TAG = "pneumo_ray.experiment"  # on every run of the sweep: the pneumo-ray experiment it belongs to


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.mlflow.experiment or cfg.experiment.name


def client(cfg: Config):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.mlflow.tracking_uri)


def check(cfg: Config) -> None:
    """Before Ray starts: MLflow is installed and a tracking server answers. A local store (sqlite:, file:) is
    only opened when the sweep starts: opening it creates it, and ``validate`` writes nothing."""
    uri = cfg.tracking.mlflow.tracking_uri
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking.mlflow.tracking_uri: MLflow is not installed; pip install 'pneumo-ray[mlflow]' "
                          "or remove the tracking section") from None
    if uri.startswith(("sqlite:", "file:")):
        return
    # One try, not MLflow's minutes of retries, for a server that is not there.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        client(cfg).search_experiments(max_results=1)
    except Exception as err:
        raise ConfigError(f"tracking.mlflow.tracking_uri: cannot use {uri} ({type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:200]}); check the URI and that the server runs"
                          ) from None


def ensure_experiment(cfg: Config) -> None:
    """The MLflow experiment, created if new. A local store's artifacts go beside it (MLflow's default is ./mlruns
    in whatever directory the sweep happens to run)."""
    uri = cfg.tracking.mlflow.tracking_uri
    tracker = client(cfg)
    if tracker.get_experiment_by_name(experiment_name(cfg)) is None:
        local = Path("/" + uri.split("://", 1)[-1].lstrip("/")) if uri.startswith(("sqlite:", "file:")) else None
        tracker.create_experiment(experiment_name(cfg), artifact_location=(
            (local.parent / "mlflow-artifacts").as_uri() if local else None))


class TrialRuns(MLflowLoggerCallback):
    """Ray's callback, except that a resumed sweep continues each trial's existing MLflow run (found by its
    trial-name tag) instead of opening a second one for it."""

    def log_trial_start(self, trial):
        if trial not in self._trial_runs:
            found = self.mlflow_util._mlflow.search_runs(
                experiment_ids=[self.mlflow_util.experiment_id], output_format="list",
                filter_string=f"tags.trial_name = '{trial}' and tags.`{TAG}` = '{self.tags[TAG]}'")
            if found:
                self._trial_runs[trial] = found[0].info.run_id
        super().log_trial_start(trial)


def callbacks(cfg: Config) -> list:
    if not cfg.tracking.mlflow.tracking_uri:
        return []
    return [TrialRuns(tracking_uri=cfg.tracking.mlflow.tracking_uri, experiment_name=experiment_name(cfg),
                      tags={TAG: cfg.experiment.name})]


def log_leaderboard(cfg: Config, exp_dir: Path, rows: list[dict]) -> None:
    """The leaderboard run (artifacts, rank 1's test metrics) and each ranked trial run's ``pneumo_ray.rank`` tag."""
    if not cfg.tracking.mlflow.tracking_uri:
        return
    tracker = client(cfg)
    experiment = tracker.get_experiment_by_name(experiment_name(cfg))
    run = tracker.create_run(experiment.experiment_id, run_name="leaderboard", tags={TAG: cfg.experiment.name})
    first = next(r for r in rows if r["rank"] == 1)
    for key, value in first.items():
        if key.startswith("test_") and isinstance(value, float):
            tracker.log_metric(run.info.run_id, f"rank1_{key.replace('@', '_at_')}", value)
    tracker.log_param(run.info.run_id, "rank1_trial", first["trial_id"])
    for name in ARTIFACTS:
        if (exp_dir / name).is_file():
            tracker.log_artifact(run.info.run_id, str(exp_dir / name))
    tracker.set_terminated(run.info.run_id)
    for row in rows:
        if row["rank"] is None:
            continue
        for trial_run in tracker.search_runs([experiment.experiment_id], filter_string=(
                f"tags.`{TAG}` = '{cfg.experiment.name}' and tags.trial_name LIKE '%{row['trial_id']}%'")):
            tracker.set_tag(trial_run.info.run_id, "pneumo_ray.rank", str(row["rank"]))
    log.info("MLflow: trials and the leaderboard logged to %s, experiment '%s'", cfg.tracking.mlflow.tracking_uri,
             experiment_name(cfg))
