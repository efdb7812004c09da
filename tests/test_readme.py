"""The README's own commands, run exactly as printed, from a user's working directory.

The smoke sweep itself is the session's ``smoke_experiment``; this file runs the README's other cheap
commands on its output (leaderboard, report, predict), so the README cannot drift from what works.
"""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import yaml
from PIL import Image

from tests.conftest import readme_commands, run_shell

pytestmark = pytest.mark.slow


def smoke_commands() -> list[str]:
    """The README's commands that read the smoke sweep's experiment, in the README's order."""
    return [c for c in readme_commands() if c.startswith("pneumo-ray ") and "results/smoke" in c]


def test_readme_commands_on_the_smoke_sweep_run_as_typed(smoke_experiment, user_workdir):
    """Each command as typed; `pneumo-ray report` rebuilds report.html and the very leaderboard the sweep wrote
    (its bootstrap is seeded: the same intervals)."""
    exp, _ = smoke_experiment
    commands = smoke_commands()
    assert {c.split()[1] for c in commands} >= {"leaderboard", "report", "predict", "export"}, commands
    board = json.loads((exp / "leaderboard.json").read_text())
    (exp / "report.html").unlink()
    for command in commands:
        for arg in shlex.split(command):  # the X-rays a user would bring, made from the smoke test split
            if arg.endswith((".png", ".jpeg", ".jpg")) and not (user_workdir / arg).exists():
                Image.new("L", (64, 64), color=128).save(user_workdir / arg)

        result = run_shell(command, cwd=user_workdir, timeout=300)

        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        if command.split()[1] in ("leaderboard", "report"):
            assert "| rank | model |" in result.stdout
        if command.split()[1] == "report":
            assert json.loads((exp / "leaderboard.json").read_text()) == board
            assert (exp / "report.html").stat().st_size > 50_000 and "report.html" in result.stdout
        if command.split()[1] == "predict":
            rows = [line.split("\t") for line in result.stdout.splitlines() if not line.startswith("#")]
            assert rows[0] == ["image", "p_pneumonia", "label"] and len(rows) >= 2
            assert all(0 <= float(p) <= 1 and label in ("normal", "pneumonia") for _, p, label in rows[1:])
        if command.split()[1] == "export":  # the model file and what a program needs to feed it
            out = user_workdir / shlex.split(command)[shlex.split(command).index("--out") + 1]
            assert (out / "preprocess.json").is_file() and len(list(out.iterdir())) == 2, list(out.iterdir())
    assert (exp / "report.html").is_file()


def test_a_leaderboard_without_checkpoints_says_where_it_looked(smoke_experiment, tmp_path):
    """What a sweep whose checkpoints went elsewhere (or were deleted) leaves: trials that reported
    epochs, and no checkpoint. The leaderboard is then an error naming the folders it searched, exit 1."""
    exp, _ = smoke_experiment
    copy = tmp_path / "smoke"
    shutil.copytree(exp, copy, ignore=shutil.ignore_patterns("checkpoint_*", "best"))

    result = run_shell(f"pneumo-ray report {copy}", cwd=tmp_path)

    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip()
    assert "\n" not in error and error.startswith("pneumo-ray: error: ")
    assert f"3 trial(s) reported epochs but no checkpoint was found under {copy}/train_runs" in error
    assert "No trial finished an epoch" not in result.stdout + result.stderr


def test_readme_optuna_dashboard_serves_the_smoke_study(smoke_experiment, user_workdir):
    """The README's optuna-dashboard command, as printed, from the user's working directory: its API lists the
    smoke sweep's study with its three trials."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    command = next(c for c in readme_commands() if c.startswith("optuna-dashboard "))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=user_workdir, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies and studies[0]["study_name"] == "smoke", studies
        with urllib.request.urlopen(f"http://127.0.0.1:8080/api/studies/{studies[0]['study_id']}", timeout=10) as r:
            assert [t["state"] for t in json.load(r)["trials"]] == ["Complete"] * 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_readme_lr_find_runs_as_typed(user_workdir):
    """The README's LR range test, exactly as printed: its plot lands in the working directory, and the range it
    prints can be pasted into search.lr."""
    command = next(c for c in readme_commands() if c.startswith("pneumo-ray lr-find"))
    result = run_shell(command, cwd=user_workdir, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    suggested = next(line for line in result.stdout.splitlines() if line.startswith("suggested: search.lr: ["))
    low, high = yaml.safe_load(suggested.split(": ", 2)[2])
    assert 0 < low < high
    plot = user_workdir / result.stdout.split("plot: ")[1].split()[0]
    assert plot.is_file() and Image.open(plot).format == "PNG"
