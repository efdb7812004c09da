"""Soak: hundreds of one-epoch trials on a 2-node loopback cluster, to catch what leaks per trial.

    python benchmarks/soak.py                       # 200 trials, 4 at a time, launcher train then inline
    python benchmarks/soak.py --trials 6 --concurrency 2   # the smoke version the tests run

For each launcher it starts a head and a worker node (``ray start``, their own temp folders, on
127.0.0.1; inside a private network namespace when ``unshare -n`` is allowed), runs one sweep through
the real entry point with ``--address``, samples the driver's RSS against the number of finished
trials, checks what is left once the driver exits (live actors and placement groups of its job on the
cluster; after the nodes are stopped by PID, any process, /dev/shm file or temp folder that appeared),
and stops the nodes by PID. Never ``ray stop``.

Pass criteria (printed, and in soak.json): every trial completes and the study has that many COMPLETE
rows; the driver's RSS grows by less than 10% between trial 20 and the last; nothing is left.
Result: benchmarks/results/soak.json and soak_rss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, matmul_gflops, median, write_result

PORT = 6393
RSS_GROWTH_LIMIT = 0.10


def node_pids(tmpdir: str) -> list[int]:
    """A node's processes: its daemons carry its RAY_TMPDIR in their environment, the workers its
    raylet spawns name the raylet's socket (under that folder) on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ, cmdline = (entry / "environ").read_bytes(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"RAY_TMPDIR={tmpdir}".encode() in environ.split(b"\0") or tmpdir.encode() in cmdline:
                found.append(int(entry.name))
    return found


def stop_node(tmpdir: str) -> None:
    """SIGTERM first, as `ray stop` does, so that Ray's own processes clean up after themselves (a killed
    dashboard leaves its multiprocessing temp folder behind); SIGKILL what is still there after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        for pid in node_pids(tmpdir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while time.time() < deadline and node_pids(tmpdir):
            time.sleep(0.2)
    shutil.rmtree(tmpdir, ignore_errors=True)


def start_cluster(env: dict, concurrency: int, node_dirs: list[str]) -> str:
    """Head (the trial slots) and worker node, 2 CPUs each, their temp folders appended to ``node_dirs``
    as they start (the caller stops whatever did start). Returns the address."""
    address = f"127.0.0.1:{PORT}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    for role, args in (("h", ["--head", f"--port={PORT}", "--dashboard-host=127.0.0.1",
                              f'--resources={{"pneumo_trial": {concurrency}}}']),
                       ("w", [f"--address={address}"])):
        node_dirs.append(tempfile.mkdtemp(prefix=f"soak{role}"))
        started = subprocess.run(["ray", "start", *args, *common], env={**env, "RAY_TMPDIR": node_dirs[-1]},
                                 capture_output=True, text=True, timeout=180)
        if started.returncode:
            raise RuntimeError(f"ray start {' '.join(args)} failed: {started.stderr[-1500:]}")
    return address


def sweep_config(workdir: Path, launcher: str, trials: int, concurrency: int) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    raw["data"].update(synthetic_train=256, synthetic_val=64, synthetic_test=64)
    raw["train"]["epochs"] = 1
    raw["search"].update(model=["mlp"], num_samples=trials, max_concurrent_trials=concurrency,
                         asha={"enabled": False})
    raw["resources"] = {"launcher": launcher, "workers_per_trial": 1, "cpus_per_worker": 1}
    raw["leaderboard"] = {"top_k": 3, "gradcam_images": 0}
    path = workdir / f"soak-{launcher}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def complete_rows(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked for a moment
        return -1


def trial_overheads(exp: Path) -> list[float]:
    """Per trial, in start order: its wall time minus its training seconds (start-up, val, checkpoint)."""
    spans = []
    for result in exp.glob("tune_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            start = rows[0]["timestamp"] - rows[0]["time_total_s"]
            spans.append((start, rows[-1]["timestamp"] - start - sum(r.get("train_seconds", 0) for r in rows)))
    return [overhead for _, overhead in sorted(spans)]


# Named, detached actors that Ray keeps for the whole cluster by design, whichever job created them first:
# Train V2 asks Ray Data's autoscaling coordinator for its workers. One per cluster, not per sweep.
CLUSTER_SERVICES = {"AutoscalingCoordinator"}


def rate(samples: list[dict], from_trial: int, to_trial: int) -> float | None:
    """Trials completed per minute between the samples where ``from_trial`` and ``to_trial`` were done."""
    start = next((s["t"] for s in samples if s["complete"] >= from_trial), None)
    end = next((s["t"] for s in samples if s["complete"] >= to_trial), None)
    return round((to_trial - from_trial) / (end - start) * 60, 2) if start is not None and end and end > start else None


def leftovers_on_cluster(address: str, job_entry: str) -> dict:
    """Live actors and placement groups that a finished driver's job still holds."""
    import ray
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    ray.init(address=address, log_to_driver=False)
    try:
        jobs = {j.job_id for j in list_jobs(limit=10_000) if job_entry in (j.entrypoint or "")}
        alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if a.job_id in jobs]
        groups = [g.placement_group_id for g in list_placement_groups(limit=10_000)
                  if g.state != "REMOVED" and g.creator_job_id in jobs]
        return {"jobs_found": len(jobs), "placement_groups": groups,
                "alive_actors": [a.class_name for a in alive if a.name not in CLUSTER_SERVICES],
                "cluster_services": [a.name for a in alive if a.name in CLUSTER_SERVICES]}
    finally:
        ray.shutdown()


def soak(workdir: Path, launcher: str, trials: int, concurrency: int) -> dict:
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    config = sweep_config(workdir, launcher, trials, concurrency)
    node_dirs: list[str] = []
    name = f"soak-{launcher}"
    exp = workdir / name
    samples, result = [], {"launcher": launcher, "trials": trials, "concurrency": concurrency}
    try:
        import psutil

        address = start_cluster(env, concurrency, node_dirs)
        # What is there once the nodes run: the sweep's leftovers are what appears after this.
        shm_before, tmp_before = set(os.listdir("/dev/shm")), set(os.listdir(tempfile.gettempdir()))
        log = workdir / f"{name}.log"
        started = time.time()
        with open(log, "w") as out:  # a file, not a pipe: an unread pipe fills and blocks the driver
            driver = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(config),
                                       "--storage", str(workdir), "--name", name, "--address", address],
                                      env={**env, "RAY_TMPDIR": node_dirs[0]}, cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT)
        proc = psutil.Process(driver.pid)
        search_done_at = None
        while driver.poll() is None:
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                break
            done = complete_rows(exp / "optuna.db")
            if done >= 0 and rss > 0:  # 0: the process is not yet running Python
                samples.append({"t": round(time.time() - started, 1), "complete": done, "rss_mb": round(rss, 1)})
                if done >= trials and search_done_at is None:
                    search_done_at = time.time()
            time.sleep(2)
        result["driver_rc"] = driver.wait()
        result["driver_tail"] = log.read_text()[-1500:]
        search_s = (search_done_at or time.time()) - started
        result["wall_s"] = round(time.time() - started, 1)
        result["search_s"] = round(search_s, 1)
        result["study_complete"] = complete_rows(exp / "optuna.db")
        result["tune_trials"] = len(list(exp.glob("tune_trial_*/result.json")))
        result["trials_per_min"] = round(result["study_complete"] / search_s * 60, 2)
        overheads = trial_overheads(exp)
        early, late = overheads[max(0, min(20, len(overheads)) - 10):20], overheads[-20:]
        result["overhead_s"] = {"around_trial_20": round(median(early), 2) if early else None,
                                "last_20": round(median(late), 2) if late else None}
        # The completion rate early and late in the search: a per-trial leak slows the late one down.
        window = max(2, min(40, trials // 5))
        result["trials_per_min_first_last"] = [rate(samples, 0, window), rate(samples, trials - window, trials)]
        rss_at = {}
        for mark in (20, trials):
            hit = next((s for s in samples if s["complete"] >= mark), None)
            rss_at[str(mark)] = hit["rss_mb"] if hit else None
        result["rss_mb_at"] = rss_at
        if rss_at.get("20") and rss_at.get(str(trials)) and trials > 20:
            result["rss_growth"] = round(rss_at[str(trials)] / rss_at["20"] - 1, 4)
        result["new_shm_files"] = sorted(set(os.listdir("/dev/shm")) - shm_before)
        result["new_temp_entries"] = sorted(set(os.listdir(tempfile.gettempdir())) - tmp_before)
        result["left_on_cluster"] = leftovers_on_cluster(address, f"--name {name} ")
    finally:
        for folder in node_dirs:
            stop_node(folder)
    result["left_processes"] = sum(len(node_pids(folder)) for folder in node_dirs)
    result["rss_curve"] = samples
    left = result["left_on_cluster"]
    result["passed"] = {
        "every_trial_completed": result["driver_rc"] == 0 and result["study_complete"] == trials
        and result["tune_trials"] == trials,
        "rss_growth_below_10pct": result.get("rss_growth") is None or result["rss_growth"] < RSS_GROWTH_LIMIT,
        "nothing_left": not (left["alive_actors"] or left["placement_groups"] or result["left_processes"]
                             or result["new_shm_files"] or result["new_temp_entries"]),
    }
    print(f"[soak {launcher}] {result['study_complete']}/{trials} complete in {result['search_s']} s "
          f"({result['trials_per_min']} trials/min; first and last {window}: "
          f"{result['trials_per_min_first_last']}); overhead {result['overhead_s']}; RSS {rss_at} MB; "
          f"left: {left}, processes {result['left_processes']}, shm {result['new_shm_files']}, "
          f"temp {result['new_temp_entries']}; passed {result['passed']}")
    return result


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        curve = run["rss_curve"]
        ax.plot([s["complete"] for s in curve], [s["rss_mb"] for s in curve], label=f"launcher: {run['launcher']}")
    ax.set_xlabel("trials complete")
    ax.set_ylabel("driver RSS (MB)")
    ax.set_title("Driver memory over a soak sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[result] {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--launchers", nargs="+", default=["train", "inline"], choices=["train", "inline"])
    parser.add_argument("--name", default="soak")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.in_namespace and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        # loopback is then the only address: Ray cannot wander onto the machine's other one
        return subprocess.run(["unshare", "-n", sys.executable, *sys.argv, "--in-namespace"]).returncode
    if args.in_namespace:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Token authentication, as Ray turns on for `ray start --head`: nodes and drivers share one token.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gflops = matmul_gflops()
    runs = []
    with tempfile.TemporaryDirectory(prefix="soak-exp-", dir=Path.home()) as workdir:  # not in /tmp: it is watched
        for launcher in args.launchers:
            runs.append(soak(Path(workdir), launcher, args.trials, args.concurrency))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, RESULTS / f"{args.name}_rss.png")
    write_result(args.name, {"trials": args.trials, "concurrency": args.concurrency, "runs": runs}, gflops)
    return 0 if all(all(r["passed"].values()) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
