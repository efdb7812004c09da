"""Bad config, data and CLI input stop the run before Ray starts: one line naming the field/file, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pneumo_ray import cli
from tests.conftest import ROOT, run_cli, write_npz

SMOKE = ROOT / "sweeps" / "configs" / "smoke.yaml"


def smoke_with(tmp_path: Path, **sections) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    for dotted, value in sections.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_main(capsys, *args) -> tuple[int, str]:
    code = cli.main(["sweep", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, expected", [
    ({"search__model": ["resnet18", "not_a_model"]}, "search.model: unknown model 'not_a_model'"),
    ({"search__optimizer": ["adamw", "lion"]}, "search.optimizer: unknown value 'lion'"),
    ({"model__finetune_lr_factor": 0}, "model.finetune_lr_factor: must be in (0, 1]"),
    ({"model__init": "he"}, "model.init: unknown value 'he'"),
    ({"model__init": "xavier_uniform", "model__pretrained": True}, "model.init: re-initialising would discard"),
    ({"search__lr": [0.1, 0.001]}, "search.lr: low 0.1 is above high 0.001"),
    ({"search__lr": [-1, 0.1]}, "search.lr: values must be positive"),
    ({"search__weight_decay": [0, 0.1]}, "search.weight_decay: values must be positive numbers (searched on a log "
                                         "scale), got 0; [0] turns weight decay off"),
    ({"search__batch_size": [64.5]}, "search.batch_size: batch sizes are whole numbers"),
    ({"search__class_weighting": ["focal"]}, "search.class_weighting: unknown value 'focal'"),
    ({"search__freeze_depth": [0, 2]}, "search.freeze_depth: freezing only makes sense for pretrained"),
    ({"train__epochs": 0}, "train.epochs: must be >= 1"),
    ({"train__epochs": "ten"}, "train.epochs: expected a whole number"),
    ({"train__epochs_typo": 3}, "train.epochs_typo: unknown field"),
    ({"train__schedule": "onecycle"}, "train.schedule: unknown value 'onecycle'"),
    ({"train__plateau_factor": 1}, "train.plateau_factor: must be in (0, 1)"),
    ({"train__early_stopping_patience": 0}, "train.early_stopping_patience: must be a whole number >= 1"),
    ({"train__monitor": "test_auc"}, "train.monitor: must be one of val_auc"),
    ({"resources__gpus_per_worker": 1.5}, "resources.gpus_per_worker: above 1 must be a whole number"),
    ({"experiment__name": "../escape"}, "experiment.name: '../escape' must be"),
    ({"search__metric": "test_auc"}, "search.metric: unknown value 'test_auc'"),
    ({"data__source": "medmnist", "data__size": 100}, "data.size: PneumoniaMNIST comes in"),
    ({"augment__normalize": "zscore"}, "augment.normalize: unknown value 'zscore'; choose from train, imagenet"),
    ({"augment__zoom": 1.5}, "augment.zoom: must be in [0, 1)"),
    ({"augment__shear_deg": 95}, "augment.shear_deg: must be in 0..90 degrees"),
    ({"data__resize": "fit"}, "data.resize: unknown value 'fit'; choose from stretch, crop, pad"),
    ({"data__split_by": "study"}, "data.split_by: unknown value 'study'; choose from patient, image"),
    ({"models": {"resnet18": {"pretrained": True}}}, "models.resnet18: is not in search.model (cnn_bn, mlp)"),
    ({"models": {"mlp": {"freeze_depth": [0, 1]}}},
     "models.mlp.freeze_depth: freezing only makes sense for pretrained"),
    ({"models": {"mlp": {"head_hidden": [64]}}}, "models.mlp.head_hidden: a new head is for timm models"),
    ({"models": {"mlp": {"head_dropout": 1.5}}}, "models.mlp.head_dropout: must be in [0, 1)"),
    ({"models": {"mlp": {"size": 4}}}, "models.mlp.size: image side in pixels must be 8..1024"),
    ({"data__source": "medmnist", "models": {"mlp": {"size": 100}}},
     "models: the largest size, 100 px, is what PneumoniaMNIST is loaded at: it must be one of (28, 64, 128, 224)"),
    ({"models": {"mlp": {"droput": 0.1}}}, "models.mlp.droput: unknown field"),
    ({"models": {"mlp": {"arch": "resnet_19"}}}, "models.mlp.arch: unknown model 'resnet_19'"),
    ({"search__sampler": "grid", "search__num_samples": 64, "search__freeze_depth": [0, 1],
      "models": {"mlp": {"arch": "resnet18", "pretrained": True}}},
     "search.sampler: grid needs every searched dimension to apply to every model, but freeze_depth"),
    ({"search__sampler": "bayes"}, "search.sampler: unknown value 'bayes'; choose from tpe, random, grid"),
    ({"search__sampler": "grid", "search__num_samples": 99}, "search.num_samples: sampler: grid has "),
    ({"search__sampler": "grid", "search__lr": []}, "search.lr: with sampler: grid, list the values"),
    ({"search__sampler": "grid", "search__num_samples": 32, "search__initial_points": [{"lr": 0.001}]},
     "search.initial_points: sampler: grid tries every point already"),
    ({"search__startup_trials": 0}, "search.startup_trials: must be >= 1"),
    ({"search__time_budget_s": 0}, "search.time_budget_s: must be a number of seconds > 0"),
    ({"resources__launcher": "ray"}, "resources.launcher: unknown value 'ray'; choose from train, inline"),
    ({"resources__launcher": "inline", "resources__workers_per_trial": 2},
     "resources.launcher: inline trains one worker per trial"),
    ({"leaderboard__threshold": "f1"}, "leaderboard.threshold: unknown value 'f1'; choose from youden, sensitivity"),
    ({"leaderboard__min_sensitivity": 1.5}, "leaderboard.min_sensitivity: must be in (0, 1]"),
    ({"leaderboard__bootstrap_resamples": 100}, "leaderboard.bootstrap_resamples: must be >= 1000"),
    ({"search__epochs": [0, 3]}, "search.epochs: values must be whole numbers in 1..10000, got 0"),
    ({"search__crop_scale": [0.8, 2]}, "search.crop_scale: values must be numbers in 0.3..1, got 2"),
    ({"search__head_dropout": ["high"]}, "search.head_dropout: values must be numbers in 0..0.99"),
    ({"train__label_smoothing": 1.5}, "train.label_smoothing: must be in [0, 1)"),
    ({"train__warmup_epochs": 2, "search__epochs": [2, 6]}, "train.warmup_epochs: must be >= 0 and below every"),
    ({"leaderboard__repeats": 0}, "leaderboard.repeats: must be a number of extra seeds >= 1, such as 3, or null"),
    ({"leaderboard__repeats": -2}, "leaderboard.repeats: must be a number of extra seeds >= 1"),
    ({"data__cv_folds": 1}, "data.cv_folds: must be 0 (off) or a number of folds >= 2, such as 5; got 1"),
    ({"data__cv_folds": -3}, "data.cv_folds: must be 0 (off) or a number of folds >= 2"),
    ({"data__cv_folds": 2, "resources__launcher": "inline"}, "data.cv_folds: folds train side by side as Ray Train"),
    # 384 + 128 synthetic images: their rarer class has far fewer than 1000
    ({"data__cv_folds": 1000}, "data.cv_folds: 1000 folds need at least 1000 images of each class in train+val"),
    # two folds of one worker, each asking for every core: never fits on the local Ray a sweep starts
    ({"data__cv_folds": 2, "resources__cpus_per_worker": os.cpu_count()},
     f"resources.cpus_per_worker: a trial needs 2 workers (2 folds x 1) x {os.cpu_count()} CPU"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, override, expected):
    code, err = run_main(capsys, "--config", str(smoke_with(tmp_path, **override)), "--storage", str(tmp_path))
    assert code == 2
    assert expected in err
    assert "\n" not in err and err.startswith("pneumo-ray: error: ")


def test_all_fixed_dimensions_is_not_a_sweep(tmp_path, capsys):
    cfg = smoke_with(tmp_path, search__model=["mlp"], search__optimizer=["adamw"], search__lr=[1e-3],
                     search__weight_decay=[1e-4], search__batch_size=[64], search__class_weighting=["none"])
    code, err = run_main(capsys, "--config", str(cfg), "--storage", str(tmp_path))
    assert code == 2 and "nothing to search" in err


def test_missing_config_file(tmp_path, capsys):
    code, err = run_main(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: config file not found" in err


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    code, err = run_main(capsys, "--config", str(bad))
    assert code == 2 and "bad.yaml" in err and "not valid YAML" in err


def test_missing_npz_file(tmp_path, capsys):
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path),
                         "--data", f"npz:{tmp_path / 'missing.npz'}")
    assert code == 2 and "missing.npz: npz file not found" in err


def test_wrong_npz_layout(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "wrong.npz"
    np.savez(path, images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4))
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--data", f"npz:{path}")
    assert code == 2 and "wrong.npz: missing array 'train_images'" in err


def test_not_an_npz_file(tmp_path, capsys):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--data", f"npz:{path}")
    assert code == 2 and "text.npz: not a readable npz file" in err


def test_split_with_one_class(tmp_path, capsys):
    path = write_npz(tmp_path / "one.npz", one_class_split="val")
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--data", f"npz:{path}")
    assert code == 2 and "the val split holds only class [1]" in err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "xray" / "train" / "NORMAL").mkdir(parents=True)
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path),
                         "--data", f"folder:{tmp_path / 'xray'}")
    assert code == 2 and "no images under train/NORMAL or train/PNEUMONIA" in err


def test_folder_of_unreadable_images(tmp_path, capsys):
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            (tmp_path / "xray" / split / cls).mkdir(parents=True)
            (tmp_path / "xray" / split / cls / "scan.jpeg").write_bytes(b"not a jpeg")
    cfg = smoke_with(tmp_path, data__cache_dir=str(tmp_path / "cache"))  # not the user's own cache folder
    code, err = run_main(capsys, "--config", str(cfg), "--storage", str(tmp_path),
                         "--data", f"folder:{tmp_path / 'xray'}")
    assert code == 2 and "none of the 2 images under train/ could be read" in err and "\n" not in err


def test_bad_data_spec(tmp_path, capsys):
    code, err = run_main(capsys, "--config", str(SMOKE), "--data", "csv:foo")
    assert code == 2 and "--data csv:foo: expected synthetic" in err


def test_resume_of_unknown_experiment(tmp_path, capsys):
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--name", "never", "--resume")
    assert code == 2 and "no experiment to resume" in err


@pytest.mark.parametrize("damage, expected", [
    ("config garbage", "the experiment's saved config is damaged"),
    ("no tuner.pkl", "Tune's saved state is damaged (tuner.pkl is missing)"),
    ("no experiment state", "Tune's saved state is damaged (no experiment_state-*.json)"),
    ("experiment state cut short", "experiment_state-2026-01-01_00-00-00.json is unreadable (JSONDecodeError)"),
])
def test_resume_of_a_damaged_experiment_is_one_line(tmp_path, capsys, damage, expected):
    """What --resume finds broken is said in one line with what to do, before Ray, and nothing is changed."""
    exp = tmp_path / "broken"
    exp.mkdir()
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["experiment"].update(name="broken", storage=str(tmp_path))
    (exp / "pneumo_config.yaml").write_text("data: [unclosed\n" if damage == "config garbage" else yaml.safe_dump(cfg))
    if damage != "no tuner.pkl":
        (exp / "tuner.pkl").write_bytes(b"pickled tuner")
    state = '{"trial_data": [], "runner_data": {}}'
    if damage != "no experiment state":
        (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(
            state[:10] if damage == "experiment state cut short" else state)
    before = {p: p.read_bytes() for p in exp.iterdir()}
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--name", "broken", "--resume")
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert "--name NEW" in err
    assert {p: p.read_bytes() for p in exp.iterdir()} == before


def test_cli_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "--num-samples", "zero"])
    assert exit_info.value.code == 2
    assert "--num-samples" in capsys.readouterr().err


def test_rejected_before_ray_starts(tmp_path):
    """Through the real entry point: exit 2, one line on stderr, and no Ray session was created."""
    result = run_cli("--config", str(smoke_with(tmp_path, search__optimizer=["lion"])), "--storage", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "search.optimizer" in result.stderr
    assert not any(Path(os.environ["RAY_TMPDIR"]).iterdir()), "Ray started before the config was checked"
    assert not (tmp_path / "smoke").exists()


@pytest.mark.parametrize("args, expected", [
    (["report", "{tmp}"], "leaderboard.json missing"),
    (["predict", "{tmp}", "x.png"], "no finished leaderboard here"),
])
def test_report_and_predict_on_a_folder_without_a_finished_sweep(tmp_path, capsys, args, expected):
    code = cli.main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "\n" not in err


def test_predict_rank_and_ensemble_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(tmp_path), "--rank", "2", "--ensemble", "x.png"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_pretrained_model_without_weights_offline_says_where_to_put_them(tmp_path):
    """No weights in the (here empty) Hugging Face cache and the Hub unreachable: one line before Ray starts,
    naming the entry's weights_file, instead of timm's minute of retries in every trial."""
    cfg = smoke_with(tmp_path, search__model=["r18"], models={"r18": {"arch": "resnet18", "pretrained": True}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(cfg),
                             "--data", "synthetic", "--storage", str(tmp_path / "results")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("pneumo-ray: error: models.r18.weights_file: no pretrained weights")
    assert "set weights_file: /path/to/resnet18.safetensors" in error[0]
    assert not (tmp_path / "results").exists()  # stopped before anything was written


def test_set_changes_any_config_field_and_bad_ones_are_one_line_errors(tmp_path, capsys):
    """--set section.field=VALUE (repeatable, VALUE as YAML) reaches the validated config after the other flags;
    a malformed one, or a value the field refuses, is one line and exit 2 before Ray starts."""
    from pneumo_ray import config

    args = cli.build_parser().parse_args([
        "sweep", "--config", str(SMOKE), "--epochs", "4", "--set", "train.epochs=6",
        "--set", "search.lr=[1.0e-4, 1.0e-2]", "--set", "model.head_dropout=0.5",
        "--set", "train.early_stopping_patience=null"])
    cfg = config.load(SMOKE, cli.sweep_overrides(args))
    assert (cfg.train.epochs, cfg.search.lr, cfg.model.head_dropout) == (6, [1e-4, 1e-2], 0.5)
    assert cfg.train.early_stopping_patience is None

    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--set", "search.sampler=bayes")
    assert code == 2
    assert err == "pneumo-ray: error: search.sampler: unknown value 'bayes'; choose from tpe, random, grid"
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path), "--set", "train.epoch=3")
    assert code == 2 and err.startswith("pneumo-ray: error: train.epoch: unknown field")
    for malformed in ("epochs=3", "train.epochs", "train.epochs=[1,"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["sweep", "--config", str(SMOKE), "--set", malformed])
        assert exited.value.code == 2 and "--set" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip().startswith("pneumo-ray 0.")


def test_validate_prints_the_config_and_plan_and_starts_and_writes_nothing(tmp_path, capsys,
                                                                          private_ray_tmpdir):
    """pneumo-ray validate: the sweep's checks, the resolved config, the plan and a time estimate from steps
    timed here; no Ray (its temp folder stays empty), no experiment folder."""
    storage = tmp_path / "results"
    code = cli.main(["validate", "--config", str(SMOKE), "--storage", str(storage), "--num-samples", "5",
                     "--set", "search.max_concurrent_trials=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    resolved = yaml.safe_load(out.split("# the plan")[0])
    assert resolved["search"]["num_samples"] == 5 and resolved["experiment"]["storage"] == str(storage)
    plan = out.split("# the plan")[1]
    assert "trials: 5 (tpe sampler over cnn_bn, mlp)" in plan and "at once: 1 trial(s)" in plan
    estimate = next(line for line in plan.splitlines() if line.startswith("estimate: "))
    assert "cnn_bn ~" in estimate and "mlp ~" in estimate and "the sweep ~" in estimate
    assert "early stopping: ASHA after 1 epochs, reduction factor 2" in plan
    assert out.rstrip().endswith("nothing was started or written")
    assert not storage.exists() and os.listdir(private_ray_tmpdir) == []

    # --epochs shorter than ASHA's grace period: the sweep caps the grace period (test_inline's grid sweep runs it)
    code = cli.main(["validate", "--config", str(SMOKE), "--storage", str(storage), "--epochs", "1",
                     "--set", "search.asha.grace_period=3"])
    assert code == 0 and "early stopping: ASHA stops none: its grace period (3 epochs) is not shorter than the " \
        "trials" in capsys.readouterr().out

    code = cli.main(["validate", "--config", str(SMOKE), "--storage", str(storage), "--set", "search.model=[vgg16]",
                     "--set", "data.size=28"])
    assert code == 2 and "search.model: 'vgg16' cannot be built for 28px images" in capsys.readouterr().err


def test_validate_times_class_weighted_training_on_a_folder_whose_images_come_class_by_class(tmp_path, capsys):
    """A folder's train images are read NORMAL first; validate's timed steps once took the first few, all normal,
    and the balanced sampler (study001 and both -cpu presets on the Kaggle folder use it) crashed on one class."""
    from tests.test_data import make_kermany_tree

    root = tmp_path / "chest_xray"
    make_kermany_tree(root, patients=(30, 30), per_patient=3)
    code = cli.main(["validate", "--config", str(SMOKE), "--storage", str(tmp_path / "results"),
                     "--data", f"folder:{root}", "--set", "search.class_weighting=[sampler]",
                     "--set", "search.batch_size=[16]"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "estimate: " in out and out.rstrip().endswith("nothing was started or written")


def test_an_mlflow_server_that_does_not_answer_is_one_line_before_ray(tmp_path, capsys):
    code, err = run_main(capsys, "--config", str(SMOKE), "--storage", str(tmp_path),
                         "--set", "tracking.mlflow.tracking_uri=http://127.0.0.1:9")
    assert code == 2 and err.startswith("pneumo-ray: error: tracking.mlflow.tracking_uri: cannot use "
                                        "http://127.0.0.1:9") and "\n" not in err
    assert not any(tmp_path.iterdir())
