"""Free space on the experiment's storage, watched while a sweep runs.

A sweep that fills its disk would fail trial after trial on checkpoints it cannot write, and Tune's
own state could be cut short. Instead, when the free space falls below what the running trials may
still write (``sweep.storage_reserve``), the watch stops the sweep the way Ctrl+C does: Tune saves its
state with the running trials marked to run again, so ``--resume`` finishes the sweep once space is
freed. A bucket has no free space to watch.
"""

from __future__ import annotations

import logging
import signal
import time

from ray.tune import Callback

from pneumo_ray import storage

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0  # the driver's loop steps far more often; a disk check on each would be wasted work


class StorageWatch(Callback):
    """Stops the sweep, resumably, when the experiment folder ``folder`` has less than ``reserve`` bytes
    free. Tune pickles it with the Tuner, so a resumed sweep is watched too."""

    def __init__(self, folder: str, reserve: int):
        self.folder, self.reserve = folder, reserve
        self._checked_at, self._stopped = 0.0, False

    def __setstate__(self, state):  # a resumed sweep starts watching afresh
        self.__dict__.update(state, _checked_at=0.0, _stopped=False)

    def on_step_begin(self, iteration, trials, **info):
        if self._stopped or time.monotonic() - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = time.monotonic()
        free = storage.free_bytes(self.folder)
        if free is not None and free < self.reserve:
            self._stopped = True
            log.warning("%s has %.0f MB free, less than the %.0f MB the running trials may need: stopping the "
                        "sweep and saving its state", self.folder, free / 2**20, self.reserve / 2**20)
            # Tune offers no call that ends a run resumably; its SIGINT handler (Ctrl+C) does just that.
            signal.raise_signal(signal.SIGINT)
