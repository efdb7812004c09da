"""Ray Train's TorchTrainer, as a sweep runs it: many short runs, each starting its own processes.

Train V2 does three things for every run that cost a trial start-up time, or the machine a busy
process, and buy a sweep nothing, so the trainer built here leaves them out:

- Ray's ``TorchConfig`` lives in a module that imports torch, so torch is imported wherever the
  trainer's config is: in the Tune trial process that builds the trainer and in the Train
  controller, neither of which trains: seconds of CPU and hundreds of MB of memory each.
  ``WorkerTorchConfig`` sets up the same process group with Ray's own functions, run on the
  workers, which import torch anyway. Ray's JAX backend imports jax the same way. What this saves
  a trial's start-up is measured by ``benchmarks/startup.py`` (docs/performance.md).
- The DatasetManager actor serves Ray Datasets. pneumo-ray's runs pass none (their data travels
  in the object store), and it is one more process, importing Ray Data, as the workers start.
- The controller registers each run's workers with Ray Data's AutoscalingCoordinator, an actor it
  starts on first use, so that an autoscaler can add nodes for them. The Ray a sweep starts on one
  machine has no nodes to add (``sweep.job_env_vars`` says so): there the trainer skips the requests
  (two blocking calls per run), and the actor, one more process waking 100 times a second beside the
  training, never starts.

All three reach behind Ray's public API (``DataParallelTrainer`` and ``BackendConfig`` are its
developer API; the set-up functions, the callback hook and the scaling policy are private).
``tests/test_train.py`` runs 1- and 2-worker trainers and checks the actors started, that the
controller never imported torch, and that DDP ranks end with the same weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)


def torch_trainer(train_fn, *, scaling_config, **kwargs):
    """A ``TorchTrainer`` for ``train_fn``: gloo on CPU workers, NCCL where they have GPUs. Same
    arguments as Ray's, less ``torch_config``."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:  # a Ray whose internals moved: its own TorchTrainer, slower to start but the same run
        from ray.train.torch import TorchTrainer

        return TorchTrainer(train_fn, scaling_config=scaling_config, **kwargs)

    class SweepTorchTrainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs.get("scaling_policy")
            if type(policy) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = _scaling_policy(policy.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    backend = "nccl" if scaling_config.use_gpu else "gloo"
    return SweepTorchTrainer(train_fn, backend_config=WorkerTorchConfig(backend=backend),
                             scaling_config=scaling_config, **kwargs)


AUTOSCALER_REQUESTS = "PNEUMO_RAY_AUTOSCALER_REQUESTS"  # "0": the cluster cannot grow, do not ask it to


def _scaling_policy(scaling_config):
    """Ray's fixed-size policy, talking to the AutoscalingCoordinator only where an autoscaler can add
    nodes. Decided in the controller, which has the job's environment (a driver may not)."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    def asks_autoscaler() -> bool:
        return os.environ.get(AUTOSCALER_REQUESTS, "1") != "0"

    class FixedSizeScalingPolicy(FixedScalingPolicy):
        def _send_resource_request(self):
            if asks_autoscaler():
                super()._send_resource_request()

        def _maybe_send_resource_request(self):
            if asks_autoscaler():
                super()._maybe_send_resource_request()

        def _cancel_resource_request(self):  # Ray's would start the coordinator just to cancel
            if asks_autoscaler():
                super()._cancel_resource_request()

    return FixedSizeScalingPolicy(scaling_config)


@dataclass
class WorkerTorchConfig(BackendConfig):
    """Ray's ``TorchConfig`` (``init_method="env"``), importing torch on the workers only."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _WorkerTorchBackend

    @property
    def train_func_context(self):
        return _WorkerTorchContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


def _torch_setup(name: str, **kwargs):
    """Runs ``ray.train.torch.config.<name>`` on a worker: Ray's own process-group code."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class _WorkerTorchBackend(Backend):
    """What Ray's ``_TorchBackend`` does for gloo and NCCL, from a controller without torch."""

    share_cuda_visible_devices = True  # as Ray's: each worker sees its node's GPUs, so NCCL can use P2P

    def on_start(self, worker_group, backend_config: WorkerTorchConfig):
        import ray
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_torch_setup, name="_set_torch_distributed_env_vars")  # RANK, LOCAL_RANK, ...
        ray.get([worker_group.execute_single_async(rank, _torch_setup, name="_setup_torch_process_group",
                                                   backend=backend_config.backend, world_rank=rank,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: WorkerTorchConfig):
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_torch_setup, name="_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        timeout_s = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s s", timeout_s)


class _WorkerTorchContext:
    """Ray's ``TorchConfigContextManager`` (a GPU worker's default CUDA device), imported on the worker."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._context = TorchConfigContextManager()
        return self._context.__enter__()

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)
