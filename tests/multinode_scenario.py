"""A real 2-node Ray cluster on loopback, inside a private network namespace, with token auth on.

Run by tests/test_multinode.py as ``unshare -n python -m tests.multinode_scenario WORKDIR``: in the new
namespace loopback is the only address, so Ray cannot wander onto the machine's other IP and nothing
leaves the machine. It starts a head and a worker node (``ray start``, separate temp dirs) and runs a
cross-validated sweep whose one trial needs both: a fold on each node. Once the folds have saved a
checkpoint it stops the worker node by PID and starts a replacement, as an autoscaler would; the trial
waits for room, restarts its folds on the head and the new node from that checkpoint, and the sweep
finishes. It prints one JSON line of what happened and stops every process it started, by PID. Never
``ray stop``.
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


def start_node(env: dict, tmpdir: str, *args: str) -> None:
    subprocess.run(["ray", "start", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", *args],
                   env={**env, "RAY_TMPDIR": tmpdir}, check=True, capture_output=True, timeout=120)


def node_names(address: str, known: dict[str, str]) -> dict[str, str]:
    """Node id -> head / worker / replacement: a node with the worker_node resource that ``known`` lacks is
    the replacement."""
    import ray

    ray.init(address=address, log_to_driver=False)
    names = dict(known)
    for n in ray.nodes():
        if n["NodeID"] not in names:
            names[n["NodeID"]] = ("head" if "worker_node" not in n["Resources"] else
                                  "worker" if not known else "replacement")
    ray.shutdown()
    return names


def fold_metas(checkpoint: Path) -> list[dict]:
    """The fold metas of one checkpoint that are whole: Ray copies a reported checkpoint into storage file by
    file, so a poll can see a meta.json that exists but is still empty."""
    metas = []
    for m in checkpoint.glob("fold_*/meta.json"):
        try:
            metas.append(json.loads(m.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    return metas


def fold_nodes(checkpoint: Path) -> dict[int, str]:
    """Fold -> the node id that trained it, from one checkpoint's fold metas."""
    return {m["fold"]: m["metrics"]["node_id"] for m in fold_metas(checkpoint)}


def checkpoints(exp: Path) -> list[Path]:
    """The trial's checkpoints with both folds' metas written in full, oldest first."""
    found = [c for c in exp.glob("train_runs/*/checkpoint_*") if len(fold_metas(c)) == 2]
    return sorted(found, key=lambda c: c.name)


def reported_epochs(exp: Path) -> list[int]:
    (result,) = exp.glob("tune_trial_*/result.json")
    return [json.loads(line)["epoch"] for line in result.read_text().splitlines()]


def main(workdir: Path) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    base_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                # after the worker node dies, the trial waits for the replacement: allow for that
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
                # The GCS marks a silent node dead after about 2 s instead of Ray's default of about 15: until
                # it does, Train may place the restarted folds on the dead node again, spending a retry
                # (resources.max_failures) on each such attempt.
                "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
    head_tmp, worker_tmp, spare_tmp = (tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("mnh", "mnw", "mns"))
    address = f"127.0.0.1:{PORT}"
    report: dict = {}
    try:
        start_node(base_env, head_tmp, "--head", f"--port={PORT}", '--resources={"pneumo_trial": 2}',
                   "--dashboard-host=127.0.0.1")
        start_node(base_env, worker_tmp, f"--address={address}", '--resources={"worker_node": 1}')
        os.environ.update({k: base_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # before Ray loads
        nodes = node_names(address, {})
        report["nodes"] = sorted(nodes.values())

        # One trial, 2 folds, each fold's worker 2 CPUs: no node has room for both folds, so they train side by
        # side on the two nodes. Its second and third epochs leave time to stop the worker node after the first.
        raw = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
        raw["search"].update(num_samples=1, max_concurrent_trials=1, model=["cnn_bn"], asha={"enabled": False})
        raw["leaderboard"]["gradcam_images"] = 0  # the report's Grad-CAM figures are test_report's
        raw["data"]["cv_folds"] = 2
        raw["train"]["epochs"] = 3
        raw["resources"] = {"workers_per_trial": 1, "cpus_per_worker": 2}
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
        while time.time() < deadline and driver.poll() is None and not checkpoints(exp):
            time.sleep(0.2)
        first = checkpoints(exp)
        report["placed_before_stop"] = {k: nodes.get(n, "?") for k, n in fold_nodes(first[0]).items()} if first else {}
        report["killed_processes"] = kill_node(worker_tmp)
        stopped_at = time.time()
        start_node(base_env, spare_tmp, f"--address={address}", '--resources={"worker_node": 1}')
        report["driver_rc"] = driver.wait(timeout=900)
        report["recovery_s"] = round(time.time() - stopped_at, 1)
        nodes = node_names(address, nodes)
        last = checkpoints(exp)
        report["placed_at_end"] = {k: nodes.get(n, "?") for k, n in fold_nodes(last[-1]).items()} if last else {}
        report["epochs"] = reported_epochs(exp)
        board = exp / "leaderboard.json"
        report["leaderboard"] = json.loads(board.read_text()) if board.exists() else None
        manifest = exp / "manifest.json"
        report["manifest_nodes"] = (json.loads(manifest.read_text())["sessions"][0]["nodes"] if manifest.exists()
                                    else None)
        report["driver_tail"] = log.read_text()[-2000:]
    finally:
        for folder in (spare_tmp, worker_tmp, head_tmp):
            kill_node(folder)
            shutil.rmtree(folder, ignore_errors=True)
    return report


if __name__ == "__main__":
    print("MULTINODE_REPORT " + json.dumps(main(Path(sys.argv[1]))))
