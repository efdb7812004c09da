"""``manifest.json``: what an experiment ran on, so that someone else can trust and reproduce it.

One file per experiment. ``data`` is the identity of the data it was started on (the npz file's MD5, or a
SHA-256 over a folder's image bytes) with its class counts; ``sessions`` holds one entry per start or
``--resume``: the command, its start and end, the package versions, the project's git commit, and each Ray
node's OS, CPU and GPUs. ``--resume`` stops when the data's identity changed and warns when packages did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from pneumo_ray import package_version, storage
from pneumo_ray.config import Config, ConfigError, DataConfig
from pneumo_ray.layout import MANIFEST_FILE

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parent.parent  # the project's root, when the package runs from a checkout
PACKAGES = ("ray", "torch", "torchvision", "timm", "optuna", "scikit-learn", "numpy", "medmnist")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_state(root: Path = CHECKOUT) -> dict | None:
    """The commit ``root`` is checked out at and whether tracked files differ from it (untracked files, such
    as results, do not count); None when ``root`` is not the top of a git checkout (an installed package)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    if shutil.which("git") is None:
        return None
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (subprocess.SubprocessError, OSError):
        return None


def packages() -> dict[str, str]:
    """Python, pneumo-ray and the libraries a result depends on, with torch's build (CUDA version or CPU)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "pneumo-ray": package_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    import torch

    found["torch build"] = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    return found


def node_facts() -> dict:
    """This machine: OS, CPU model, cores, and the GPUs nvidia-smi lists (name, memory). Runs on each Ray node."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            gpus = [{"name": name.strip(), "memory_mib": int(mib)} for name, mib in
                    (line.rsplit(",", 1) for line in out.splitlines() if "," in line)]
        except (subprocess.SubprocessError, OSError, ValueError):
            gpus = [{"name": "nvidia-smi failed"}]
    return {"hostname": platform.node(), "os": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus}


def cluster_nodes() -> list[dict]:
    """node_facts of every live Ray node: this one directly, each other one by a zero-CPU task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    remote = ray.remote(num_cpus=0)(node_facts)
    nodes = []
    for node in (n for n in ray.nodes() if n.get("Alive")):
        entry = {"node_id": node["NodeID"], "address": node.get("NodeManagerAddress"),
                 "ray_resources": {k: v for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")}}
        try:
            entry.update(node_facts() if node["NodeID"] == here else ray.get(remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(), timeout=60))
        except Exception as err:  # a node that cannot run a task now: say so rather than fail the sweep
            entry["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        nodes.append(entry)
    return nodes


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(data: DataConfig, splits) -> dict:
    """What the data is: the file's MD5 (the checksum medmnist verifies) or a folder's SHA-256 over every image's
    split, class, name and bytes (bytes, not mtimes: a copy of the same images is the same data), and the class
    counts per split as loaded (a folder's carved val included)."""
    import numpy as np

    from pneumo_ray.data import SPLITS, files_digest, folder_files, medmnist_file

    counts = {s: dict(zip(splits.class_names, np.bincount(splits.split(s)[1], minlength=2).tolist())) for s in SPLITS}
    identity = {"source": data.source, "image_size": splits.image_size}
    if data.source in ("npz", "medmnist"):
        path = Path(data.path).expanduser() if data.source == "npz" else medmnist_file(data)
        identity.update(file=str(path.resolve()), md5=file_md5(path))
    elif data.source == "folder":
        root = Path(data.path).expanduser().resolve()
        identity.update(folder=str(root), sha256=files_digest(folder_files(root)[0]),
                        hashed="each image file's bytes, split, class and name")
    else:
        identity.update(generated_from="the config's data.synthetic_* sizes and experiment.seed")
    identity["class_counts"] = counts
    if data.cv_folds:
        identity["cv_folds"] = data.cv_folds
    if data.source == "folder" or data.cv_folds:  # what a carved val and the folds kept together
        identity["split_by"] = "image" if splits.patients is None else "patient"
    return identity


def load(exp_uri: str) -> dict | None:
    path = storage.join(exp_uri, MANIFEST_FILE)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except ValueError:
        return None


def as_started(cfg: Config, exp_uri: str) -> Config:
    """``cfg`` (an experiment's saved config) with the split its experiment began on: one started before
    data.split_by carved val image by image, and its trials, thresholds and report must keep to that val."""
    started_on = (load(exp_uri) or {}).get("data", {})
    if started_on and "split_by" not in started_on:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_by="image"))
    return cfg


def check_resume(exp_uri: str, identity: dict) -> None:
    """--resume goes on only with the data the experiment started on; other package versions are a warning (a
    result may then differ in its last digits, not in meaning). Experiments from before the manifest pass."""
    saved = load(exp_uri)
    if not saved:
        return
    before = saved["data"]
    for key in ("md5", "sha256", "class_counts", "image_size"):
        if before.get(key) != identity.get(key):
            where = identity.get("file") or identity.get("folder") or identity["source"]
            raise ConfigError(f"data: {where} changed since this experiment started ({key} was {before.get(key)}, "
                              f"is {identity.get(key)}); resume it on the data it started with, or start a new "
                              "experiment with --name NEW")
    current = packages()
    changed = {name: (old, current.get(name)) for name, old in saved["sessions"][-1]["packages"].items()
               if current.get(name) != old}
    if changed:
        log.warning("resuming with other package versions than the last session: %s",
                    ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items()))


def begin_session(cfg: Config, identity: dict, argv: list[str] | None = None) -> None:
    """Add this start (or --resume) to the manifest, with Ray's view of the cluster; Ray must be running."""
    import ray

    saved = load(cfg.experiment_uri) or {"experiment": cfg.experiment.name, "data": identity, "sessions": []}
    if saved["sessions"] and saved["sessions"][-1]["outcome"] == "running":  # its driver never closed it
        saved["sessions"][-1]["outcome"] = "killed (its driver ended without closing this session)"
    saved["sessions"].append({
        "command": shlex.join(argv if argv is not None else sys.argv), "cwd": os.getcwd(), "started": now(),
        "ended": None, "outcome": "running", "git": git_state(), "packages": packages(),
        "cluster_resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        "nodes": cluster_nodes()})
    storage.write_text(storage.join(cfg.experiment_uri, MANIFEST_FILE), json.dumps(saved, indent=1))


def end_session(exp_uri: str, outcome: str) -> None:
    """Close the last session: when its trials ended, and how (finished, interrupted, failed: ...)."""
    saved = load(exp_uri)
    if saved and saved["sessions"]:
        saved["sessions"][-1].update(ended=now(), outcome=outcome)
        storage.write_text(storage.join(exp_uri, MANIFEST_FILE), json.dumps(saved, indent=1))
