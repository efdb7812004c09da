"""One line at each trial's end, beside Tune's status table: trials done of the total, the best so far, the
time this session has run, and an estimate of the time left.

    [pneumo-ray] trials 5/16 done · best val_auc 0.9941 (trial 3f2a1c0d, cnn_bn) · elapsed 4m12s · ETA ~9m

The estimate is this session's time per ended trial times the trials left: rough while ASHA still stops trials
early and while the first, concurrent ones end together; a time budget (search.time_budget_s) caps it.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine(Callback):
    """Logs the line after every trial that ends (finished, stopped by ASHA, or failed). Tune pickles it with the
    Tuner; a resumed sweep restarts its clock in ``setup`` and counts the trials ended before it as done."""

    def __init__(self, total: int, metric: str, mode: str, time_budget_s: float | None = None):
        self.total, self.metric, self.mode, self.time_budget_s = total, metric, mode, time_budget_s
        self.started, self.ended_before, self.ended = time.time(), None, set()

    def setup(self, **info):
        self.started, self.ended_before, self.ended = time.time(), None, set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.log_line(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log_line(trials, trial)

    def log_line(self, trials, trial) -> None:
        log.info("%s", self.line(trials, trial))

    def line(self, trials, trial) -> str:
        ended_now = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
        if self.ended_before is None:  # the first trial to end in this session: the rest ended in an earlier one
            self.ended_before = ended_now - {trial.trial_id}
        self.ended.add(trial.trial_id)
        done = len(self.ended_before | self.ended | ended_now)
        elapsed = time.time() - self.started
        parts = [f"trials {done}/{self.total} done"]
        scored = [(t.metric_analysis[self.metric][self.mode], t) for t in trials
                  if self.metric in (t.metric_analysis or {})]
        if scored:
            value, best = (max if self.mode == "max" else min)(scored, key=lambda pair: pair[0])
            parts.append(f"best {self.metric} {value:.4f} (trial {best.trial_id}, {best.config.get('model', '?')})")
        parts.append(f"elapsed {duration(elapsed)}")
        left = max(0, self.total - done)
        if left:
            eta = elapsed / len(self.ended) * left
            if self.time_budget_s is not None:
                eta = min(eta, max(0.0, self.time_budget_s - elapsed))
            parts.append(f"ETA ~{duration(eta)}")
        return " · ".join(parts)
