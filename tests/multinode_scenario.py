"""A real 2-node Ray cluster on loopback, inside a private network namespace, with token auth on.

Run by tests/test_multinode.py as ``unshare -n python -m tests.multinode_scenario WORKDIR``: in the new
namespace loopback is the only address, so Ray cannot wander onto the machine's other IP and nothing
leaves the machine. It starts a head and a worker node (``ray start``, separate temp dirs), runs a sweep
whose trials land on both, stops the worker node by PID mid-sweep, lets the sweep finish on the head,
prints one JSON line of what happened, and stops every process it started, by PID. Never ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PORT = 6391


def pids_with_tmpdir(tmpdir: str) -> list[int]:
    """Processes of one node: its daemons carry its RAY_TMPDIR in their environment, and the Python
    workers its raylet spawns name the raylet's socket, under that temp dir, on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"RAY_TMPDIR={tmpdir}".encode() in environ or tmpdir.encode() in cmdline:
                found.append(int(entry.name))
    return found


def kill_node(tmpdir: str) -> int:
    pids = [p for p in pids_with_tmpdir(tmpdir) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30  # gone, not dying: the next test's sweep refuses to start beside a live Ray
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and not zombie(pid) for pid in pids):
        time.sleep(0.1)
    return len(pids)


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def node_of_epochs(exp: Path) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for trial_dir in exp.glob("tune_trial_*"):
        result = trial_dir / "result.json"
        lines = result.read_text().splitlines() if result.exists() else []
        rows = [json.loads(line) for line in lines]
        out[trial_dir.name.split("_")[2]] = [(r["epoch"], r.get("node_id", "")) for r in rows]
    return out


def cross_validated_trial_nodes(workdir: Path, address: str, env: dict, head_tmp: str, nodes: dict) -> dict:
    """One trial with data.cv_folds: 2 whose fold workers take 2 CPUs each: no node has room for both, so its
    folds must run side by side on the two nodes. Returns fold -> the node that trained it (from each fold's
    checkpoint), and the driver's exit code."""
    raw = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    raw["search"].update(num_samples=1, max_concurrent_trials=1, model=["cnn_bn"], asha={"enabled": False})
    raw["data"]["cv_folds"] = 2
    raw["train"]["epochs"] = 1
    raw["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 2}
    config = workdir / "folds.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(config), "--storage",
                          str(workdir), "--name", "folds", "--address", address], env={**env, "RAY_TMPDIR": head_tmp},
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    placed = {}
    for meta in (workdir / "folds" / "train_runs").glob("*/checkpoint_*/fold_*/meta.json"):
        fold = json.loads(meta.read_text())
        placed[fold["fold"]] = nodes.get(fold["metrics"]["node_id"], "?")
    return {"placed": placed, "driver_rc": run.returncode, "tail": (run.stdout + run.stderr)[-1500:]}


def main(workdir: Path) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    base_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                # after the worker node dies, its trial waits for the head to free up: allow for that
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    head_tmp, worker_tmp = tempfile.mkdtemp(prefix="mnh", dir="/tmp"), tempfile.mkdtemp(prefix="mnw", dir="/tmp")
    address = f"127.0.0.1:{PORT}"
    report: dict = {}
    try:
        subprocess.run(["ray", "start", "--head", f"--port={PORT}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        '--resources={"pneumo_trial": 2}', "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
                       env={**base_env, "RAY_TMPDIR": head_tmp}, check=True, capture_output=True, timeout=120)
        subprocess.run(["ray", "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        '--resources={"worker_node": 1}', "--disable-usage-stats"],
                       env={**base_env, "RAY_TMPDIR": worker_tmp}, check=True, capture_output=True, timeout=120)

        os.environ.update({k: base_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray loads
        import ray

        ray.init(address=address, log_to_driver=False)
        nodes = {n["NodeID"]: ("worker" if "worker_node" in n["Resources"] else "head")
                 for n in ray.nodes() if n["Alive"]}
        ray.shutdown()
        report["nodes"] = sorted(nodes.values())

        report["fold_nodes"] = cross_validated_trial_nodes(workdir, address, base_env, head_tmp, nodes)

        raw = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
        # Two trials, one per node, at once. Six epochs of 768 images leave time to stop the worker node
        # mid-trial, as soon as both nodes have reported an epoch.
        raw["search"].update(num_samples=2, max_concurrent_trials=2, model=["cnn_bn"])
        raw["data"]["synthetic_train"] = 768
        raw["train"]["epochs"] = 6
        raw["resources"] = {"workers_per_trial": 2, "cpus_per_worker": 1}  # one trial fills one node
        raw["search"]["asha"] = {"enabled": False}
        config = workdir / "multinode.yaml"
        config.write_text(yaml.safe_dump(raw))
        exp = workdir / "multinode"
        log = workdir / "driver.log"  # a file, not a pipe: an unread pipe fills and blocks the driver
        with open(log, "w") as out:
            driver = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(config),
                                       "--storage", str(workdir), "--name", "multinode", "--address", address],
                                      env={**base_env, "RAY_TMPDIR": head_tmp}, cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:
            # Trials on both nodes, as Tune has recorded them: a checkpoint the controller has not yet
            # registered when the node dies is (rightly) not resumed from, and the trial restarts instead.
            if {"head", "worker"} <= {nodes.get(n) for rows in node_of_epochs(exp).values() for _, n in rows}:
                break
            time.sleep(0.2)
        report["placed_before_stop"] = sorted(s for s in {nodes.get(n) for rows in node_of_epochs(exp).values()
                                                         for _, n in rows} if s)
        report["killed_processes"] = kill_node(worker_tmp)
        stopped_at = time.time()
        report["driver_rc"] = driver.wait(timeout=900)
        out = log.read_text()
        report["recovery_s"] = round(time.time() - stopped_at, 1)
        report["epochs"] = {t: [(e, nodes.get(n, "?")) for e, n in rows] for t, rows in node_of_epochs(exp).items()}
        board = exp / "leaderboard.json"
        report["leaderboard"] = json.loads(board.read_text()) if board.exists() else None
        manifest = exp / "manifest.json"
        report["manifest_nodes"] = (json.loads(manifest.read_text())["sessions"][0]["nodes"] if manifest.exists()
                                    else None)
        report["driver_tail"] = out[-2000:]
    finally:
        kill_node(worker_tmp)
        kill_node(head_tmp)
        for folder in (worker_tmp, head_tmp):
            shutil.rmtree(folder, ignore_errors=True)
    return report


if __name__ == "__main__":
    print("MULTINODE_REPORT " + json.dumps(main(Path(sys.argv[1]))))
