"""Where the Ray Train / plain-loop gap goes: training steps inside a real 1-worker TorchTrainer, in short
blocks that alternate between three states of the rest of Ray:

  running          everything as in a sweep
  helpers_paused   Ray Train's per-run helper actors (controller, SynchronizationActor, ...) and any other
                   Ray worker process paused with SIGSTOP
  all_paused       those and Ray's daemons (raylet, GCS, dashboard, agents, log monitor) paused

Blocks are a few seconds each and alternate round by round, so the machine's slow drift cancels out in the
paired ratios. Only this script's own Ray is touched: what it pauses are descendants of this process, and
every one is resumed (SIGCONT) right after its block.

    python benchmarks/ray_background.py [--model resnet18] [--rounds 8] [--steps 12] [--max-train N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
from pathlib import Path

import psutil
from common import data_config, matmul_gflops, median, write_result

BATCH = 128
STATES = ("running", "helpers_paused", "all_paused")


def label(process) -> str:
    """'ray::TrainController' for a Ray worker process, else the daemon's program or script name."""
    cmd = process.cmdline()
    if cmd and cmd[0].startswith(("ray::", "ray-dashboard-")):  # titles Ray sets: 'ray-dashboard-JobHead-0 (...)'
        return cmd[0].split()[0].split(".")[0]
    return os.path.basename(next((c for c in cmd[1:] if c.endswith(".py")), cmd[0] if cmd else process.name()))


def send(processes, sig) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:  # Ray may retire an idle worker at any time
            pass


def is_stopped(process) -> bool:
    try:
        return process.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def train_fn(config: dict) -> None:
    """The Train worker: blocks of the project's training steps, the rest of Ray running or paused."""
    import time

    import ray
    import torch
    import torch.nn.functional as F

    from pneumo_ray.augment import train_batch
    from pneumo_ray.config import Config
    from pneumo_ray.models import build_model
    from pneumo_ray.train import make_optimizer

    cfg = Config()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    splits = ray.get(config["splits_ref"])
    mean, std = splits.train_mean_std()
    images = torch.from_numpy(splits.train_x[:BATCH].copy())
    labels = torch.from_numpy(splits.train_y[:BATCH].copy()).long()
    model = build_model(config["model"], splits.image_size)
    optimizer = make_optimizer(model, {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4}, cfg)
    generator = torch.Generator().manual_seed(0)

    def block() -> float:
        started = time.perf_counter()
        for _ in range(config["steps"]):
            x = train_batch(images, mean, std, cfg.augment, generator)
            loss = F.cross_entropy(model(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return config["steps"] * BATCH / (time.perf_counter() - started)

    me = os.getpid()
    others = [p for p in psutil.Process(config["driver_pid"]).children(recursive=True) if p.pid != me]
    daemons = [p for p in others if label(p) in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
               or not label(p).startswith("ray::")]
    helpers = [p for p in others if p not in daemons]
    paused = {"helpers_paused": helpers, "all_paused": helpers + daemons}
    all_resumed = True

    def measure(state: str) -> float:
        nonlocal all_resumed
        group = paused.get(state, [])
        send(group, signal.SIGSTOP)
        try:
            return block()
        finally:
            send(group, signal.SIGCONT)
            all_resumed &= not any(is_stopped(p) for p in group)

    block()  # warm-up
    speeds: dict[str, list[float]] = {state: [] for state in STATES}
    for i in range(config["rounds"]):
        for state in (STATES if i % 2 == 0 else STATES[::-1]):
            speeds[state].append(measure(state))
    # a file, not ray.train.report: Train V2 keeps only the metrics of reports that carry a checkpoint
    Path(config["out"]).write_text(json.dumps({"speeds": speeds, "all_resumed": all_resumed,
                                               "helpers": sorted(label(p) for p in helpers),
                                               "daemons": sorted(label(p) for p in daemons)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rounds", type=int, default=8, help="blocks per state, alternating")
    parser.add_argument("--steps", type=int, default=12, help="training steps (batch 128) per block")
    parser.add_argument("--max-train", type=int, default=None)
    args = parser.parse_args()
    speed_at_start = matmul_gflops()

    import ray
    import ray.train

    from pneumo_ray.cluster import start_local_ray
    from pneumo_ray.config import Config
    from pneumo_ray.torch_trainer import torch_trainer

    _, splits, data_kind = data_config(args.max_train)
    cores = os.cpu_count() or 1
    start_local_ray(Config(), log_to_driver=False)  # the Ray a local sweep runs on, dashboard included
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch, "speeds.json")
        try:
            torch_trainer(  # a sweep's trainer
                train_fn,
                train_loop_config={"splits_ref": ray.put(splits), "model": args.model, "rounds": args.rounds,
                                   "steps": args.steps, "threads": cores, "driver_pid": os.getpid(), "out": str(out)},
                scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cores}),
                run_config=ray.train.RunConfig(name="ray_background", storage_path=scratch)).fit()
        finally:
            send(psutil.Process().children(recursive=True), signal.SIGCONT)  # should the worker die mid-block
            ray.shutdown()
        report = json.loads(out.read_text())
    speeds = report["speeds"]
    variants = {}
    for state in STATES:
        paired = [s / r for s, r in zip(speeds[state], speeds["running"])]
        variants[state] = {"images_per_s": median(speeds[state]), "images_per_s_all": [round(s, 1) for s in speeds[state]],
                           "over_running_paired": median(paired)}
        print(f"[{state:14s}] {variants[state]['images_per_s']:.0f} img/s, {variants[state]['over_running_paired']:.3f}x "
              f"running (median of {len(paired)} pairs)")
    print(f"[paused] helpers: {', '.join(report['helpers'])}; daemons: {', '.join(report['daemons'])}")
    write_result("ray_background", {"data": data_kind, "model": args.model, "batch_size": BATCH,
                                    "steps_per_block": args.steps, "rounds": args.rounds, "variants": variants,
                                    "paused": {"helpers": report["helpers"], "daemons": report["daemons"]},
                                    "all_resumed": report["all_resumed"]}, speed_at_start)


if __name__ == "__main__":
    main()
