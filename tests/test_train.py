"""The one training loop: in-process, under Ray Train with 1 worker and with 2 DDP workers, and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumo_ray import config
from pneumo_ray.data import load_splits
from pneumo_ray.layout import MODEL_FILE, STATE_FILE
from pneumo_ray.models import build_model
from pneumo_ray.schedule import lr_factor, monitor_for
from pneumo_ray.train import LocalSession, epoch_indices, fit, make_optimizer
from tests.conftest import wait_for_free_cpus

PARAMS = {"model": "cnn_bn", "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64,
          "class_weighting": "loss", "freeze_depth": 0}


def small_cfg(epochs=3, **data):
    return config.from_dict({"data": {"source": "synthetic", "synthetic_train": 256, "synthetic_val": 64,
                                      "synthetic_test": 64, **data},
                             "train": {"epochs": epochs, "warmup_epochs": 0}})


def test_loss_falls_in_process():
    cfg = small_cfg(epochs=4)
    session = LocalSession(threads=1)
    fit(cfg, PARAMS, load_splits(cfg.data), session)
    losses = [h["train_loss"] for h in session.history]
    assert [h["epoch"] for h in session.history] == [1, 2, 3, 4]
    assert losses[-1] < 0.7 * losses[0], losses
    for key in ("val_loss", "val_acc", "val_balanced_acc", "val_auc", "val_f1", "val_sensitivity", "val_specificity"):
        assert 0 <= session.history[-1][key] <= (10 if key == "val_loss" else 1), key
    assert session.history[-1]["val_auc"] > 0.8


def test_a_trial_trains_with_its_own_epochs_dropout_and_label_smoothing(tmp_path):
    """The optional search dimensions reach the loop: the trial's epoch count (not train.epochs), its head
    dropout (in the model and in the checkpoint's meta, which the leaderboard rebuilds the model from) and
    its label smoothing (the same seeded run, smoothed, pays more loss for the same confident answers)."""
    cfg = small_cfg(epochs=3)
    splits = load_splits(cfg.data)
    session = LocalSession(threads=1, checkpoint_dir=str(tmp_path))
    params = {**PARAMS, "model": "mlp", "epochs": 2, "head_dropout": 0.5, "label_smoothing": 0.4}
    model = fit(cfg, params, splits, session)
    assert [h["epoch"] for h in session.history] == [1, 2]
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    assert json.loads((tmp_path / "meta.json").read_text())["head_dropout"] == 0.5
    unsmoothed = LocalSession(threads=1)
    fit(cfg, {**params, "label_smoothing": 0.0}, splits, unsmoothed)
    assert session.history[-1]["train_loss"] > unsmoothed.history[-1]["train_loss"] + 0.05


def test_a_trial_trains_with_the_studies_augmentations_and_keeps_its_normalisation(tmp_path):
    """Shear, zoom and brightness/contrast jitter run in the loop; ImageNet normalisation is what the checkpoint
    records, so the leaderboard and predict standardise test images the same way."""
    raw = small_cfg(epochs=1).to_dict()
    raw["augment"].update(shear_deg=10, zoom=0.1, brightness=0.2, contrast=0.2, normalize="imagenet")
    cfg = config.from_dict(raw)
    session = LocalSession(threads=1, checkpoint_dir=str(tmp_path))
    fit(cfg, {**PARAMS, "model": "mlp"}, load_splits(cfg.data), session)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["mean"], meta["std"], meta["normalize"]) == (0.449, 0.226, True)
    assert np.isfinite(session.history[-1]["train_loss"]) and 0 <= session.history[-1]["val_auc"] <= 1


def test_per_model_settings_reach_each_model(tmp_path):
    """Two entries of one sweep: a scratch MLP with its own dropout, and a ResNet-18 from a weights file the test
    writes itself (timm's real loading path), with a new MLP head and a frozen stem. Each trial builds its own,
    and its checkpoint rebuilds it (the leaderboard and predict load models from it)."""
    import timm

    from pneumo_ray.checkpoints import load_model

    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    weights = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), weights)
    raw = small_cfg(epochs=1).to_dict()
    raw["search"]["model"] = ["mlp_wide_drop", "r18"]
    raw["models"] = {"mlp_wide_drop": {"arch": "mlp", "head_dropout": 0.6, "size": 20},
                     "r18": {"arch": "resnet18", "pretrained": True, "weights_file": str(weights),
                             "head_hidden": [32], "freeze_depth": [1]}}
    cfg = config.from_dict(raw)
    splits = load_splits(cfg.data)
    for label, checkpoint in (("mlp_wide_drop", tmp_path / "mlp"), ("r18", tmp_path / "r18")):
        session = LocalSession(threads=1, checkpoint_dir=str(checkpoint))
        model = fit(cfg, {**PARAMS, "model": label, "freeze_depth": 1 if label == "r18" else 0}, splits, session)
        meta = json.loads((checkpoint / "meta.json").read_text())
        assert meta["model"] == label and meta["arch"] == raw["models"][label]["arch"]
        assert meta["image_size"] == (20 if label == "mlp_wide_drop" else 28)  # its own size, else data.size
        assert torch.equal(next(iter(load_model(checkpoint, meta).state_dict().values())),
                           next(iter(model.state_dict().values())))
    mlp = load_model(tmp_path / "mlp", json.loads((tmp_path / "mlp" / "meta.json").read_text()))
    assert [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)] == [0.6, 0.6]
    assert [type(m).__name__ for m in model.fc] == ["Linear", "ReLU", "Linear"] and model.fc[0].out_features == 32
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))  # frozen: as loaded
    assert not torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)  # trained


class Interrupted(RuntimeError):
    pass


class DyingSession(LocalSession):
    """A LocalSession whose process 'dies' right after the checkpoint of epoch ``die_after``."""

    die_after: int = 0

    def report(self, metrics, write_checkpoint):
        super().report(metrics, write_checkpoint)
        if metrics["epoch"] == self.die_after:
            raise Interrupted


def straight_and_interrupted(epochs: int, checkpoint_dir, **train):
    """A run of ``epochs`` start to end, and one that died after its epoch-2 checkpoint in
    ``checkpoint_dir``: (config, splits, the straight run's session and model). ``train``: train.* settings."""
    cfg = small_cfg(epochs=epochs, synthetic_train=96, synthetic_val=32)  # bit-identity needs no more images
    for key, value in train.items():
        setattr(cfg.train, key, value)
    splits = load_splits(cfg.data)
    straight = LocalSession(threads=1)
    reference = fit(cfg, PARAMS, splits, straight)
    dying = DyingSession(threads=1, checkpoint_dir=str(checkpoint_dir))
    dying.die_after = 2
    with pytest.raises(Interrupted):
        fit(cfg, PARAMS, splits, dying)
    return cfg, splits, straight, reference


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    cfg, splits, straight, reference = straight_and_interrupted(4, tmp_path)
    resumed = LocalSession(threads=1, checkpoint_dir=str(tmp_path))
    model = fit(cfg, PARAMS, splits, resumed)

    assert [h["epoch"] for h in resumed.history] == [3, 4], "the epoch counter continues; it does not restart"
    # Weights, optimizer, schedule and RNG state all come back, so the result is the same run.
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert resumed.history[-1]["val_auc"] == straight.history[-1]["val_auc"]


@pytest.mark.parametrize("damaged", [MODEL_FILE, STATE_FILE])
def test_an_unreadable_checkpoint_starts_the_trial_over_with_a_warning(tmp_path, caplog, damaged):
    """A checkpoint cut short (a full disk, an interrupted copy) must not fail the trial for good: it
    trains again from epoch 1, to the same result as a run that never had a checkpoint."""
    cfg, splits, _, reference = straight_and_interrupted(3, tmp_path)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    resumed = LocalSession(threads=1, checkpoint_dir=str(tmp_path))
    with caplog.at_level("WARNING", logger="pneumo_ray"):
        model = fit(cfg, PARAMS, splits, resumed)

    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert f"{tmp_path} is unreadable" in caplog.text and "again from epoch 1" in caplog.text
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_epoch_shards_are_disjoint_and_equal():
    labels = np.array([0] * 30 + [1] * 71)
    a = epoch_indices(labels, "none", seed=0, epoch=3, rank=0, world=2)
    b = epoch_indices(labels, "none", seed=0, epoch=3, rank=1, world=2)
    assert len(a) == len(b) == 51
    assert len(set(a.tolist()) | set(b.tolist())) == 101  # every image is seen by some rank
    assert len(set(a.tolist()) & set(b.tolist())) <= 1  # only the wrap-around padding may repeat
    sampled = epoch_indices(labels, "sampler", seed=0, epoch=0, rank=0, world=1)
    share_normal = float((labels[sampled.numpy()] == 0).mean())
    assert 0.4 < share_normal < 0.6, "the weighted sampler should balance the classes"


def test_lr_schedule_warms_up_then_decays_and_holds_body_during_head_warmup():
    cfg = small_cfg(epochs=10)
    cfg.train.warmup_epochs, cfg.model.head_warmup_epochs = 2, 1
    factors = [lr_factor(step, 10, cfg, True, 1e-3) for step in range(100)]
    assert factors[0] == pytest.approx(0.05) and factors[19] == pytest.approx(1.0)
    assert factors[20] > factors[60] > factors[99] >= 0
    assert [lr_factor(s, 10, cfg, False, 1e-3) for s in range(10)] == [0.0] * 10
    assert lr_factor(10, 10, cfg, False, 1e-3) == factors[10]
    cfg.model.finetune_lr_factor = 0.1  # stage two: the body at a tenth of the head's LR, step for step
    assert [lr_factor(s, 10, cfg, False, 1e-3) for s in range(100)] == pytest.approx(
        [0.0] * 10 + [0.1 * f for f in factors[10:]])
    assert [lr_factor(s, 10, cfg, True, 1e-3) for s in range(100)] == factors


def torch_lrs(scheduler_class, epochs: int, **kwargs) -> list[float]:
    """The LR of each epoch under torch's own scheduler, stepped once an epoch."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler, lrs = scheduler_class(optimizer, **kwargs), []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule, reference", [
    ({"schedule": "constant"}, lambda: [1e-2] * 12),
    ({"schedule": "step", "step_epochs": 5, "gamma": 0.5}, lambda: torch_lrs(torch.optim.lr_scheduler.StepLR, 12,
                                                                               step_size=5, gamma=0.5)),
    ({"schedule": "cosine", "min_lr": 1e-4}, lambda: torch_lrs(torch.optim.lr_scheduler.CosineAnnealingLR, 12,
                                                                T_max=12, eta_min=1e-4)),
])
def test_each_schedule_gives_the_lr_sequence_torch_defines(schedule, reference):
    """One step per epoch, no warm-up: the LR of each epoch equals torch's scheduler (study 001's
    CosineAnnealingLR with eta_min, StepLR, a constant LR)."""
    cfg = small_cfg(epochs=12)
    cfg.train.warmup_epochs = 0
    for key, value in schedule.items():
        setattr(cfg.train, key, value)
    ours = [1e-2 * lr_factor(epoch, 1, cfg, True, 1e-2) for epoch in range(12)]
    assert ours == pytest.approx(reference(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("maximize", [True, False])
def test_plateau_cuts_the_lr_as_torchs_reduce_lr_on_plateau(maximize):
    """The same metric sequence through our Monitor and through torch's ReduceLROnPlateau (absolute
    threshold min_delta, min_lr): the same LR every epoch. Study 003's factor 0.3, patience 2."""
    cfg = small_cfg(epochs=30)
    cfg.train.schedule, cfg.train.plateau_factor, cfg.train.plateau_patience = "plateau", 0.3, 2
    cfg.train.min_lr, cfg.train.min_delta = 1e-4, 0.01
    cfg.search.metric = "val_auc" if maximize else "val_loss"
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.normal(0.004, 0.02, 30)) * (1 if maximize else -1)  # improves, stalls, improves
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if maximize else "min", factor=0.3, patience=2, threshold=0.01, threshold_mode="abs",
        min_lr=1e-4)
    monitor, ours, theirs = monitor_for(cfg), [], []
    for epoch, value in enumerate(values, start=1):
        monitor.update(float(value), cfg, 1e-2)
        reference.step(float(value))
        ours.append(1e-2 * lr_factor(epoch, 1, cfg, True, 1e-2) * monitor.lr_scale)
        theirs.append(optimizer.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert len(set(np.round(theirs, 12))) >= 3 and min(theirs) == pytest.approx(1e-4)  # it did cut, to the floor


@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_stops_at_the_patience_and_says_so(patience):
    """min_delta 1 means no epoch after the first can improve val AUC: the trial stops after exactly
    ``patience`` more epochs, and its last report says so."""
    cfg = small_cfg(epochs=8, synthetic_train=96, synthetic_val=32)
    cfg.train.early_stopping_patience, cfg.train.min_delta = patience, 1.0
    session = LocalSession(threads=1)
    fit(cfg, PARAMS, load_splits(cfg.data), session)
    assert [h["epoch"] for h in session.history] == list(range(1, patience + 2))
    assert [h["early_stopped"] for h in session.history] == [0] * patience + [1]

    cfg.train.min_delta = 0.0  # a metric that can improve: the trial runs while it does
    session = LocalSession(threads=1)
    fit(cfg, PARAMS, load_splits(cfg.data), session)
    aucs, stopped_at = [h["val_auc"] for h in session.history], len(session.history)
    best = max(range(stopped_at), key=lambda i: (aucs[i], -i))  # the first epoch with the best AUC
    assert stopped_at == 8 or stopped_at - 1 - best == patience, (aucs, patience)


def test_a_resumed_trial_remembers_its_plateau_and_its_wait(tmp_path):
    """Plateau schedule and early stopping on: a run that died after its epoch-2 checkpoint and was
    resumed is the uninterrupted run, bit for bit, which needs the monitor's state in the checkpoint."""
    overrides = {"schedule": "plateau", "plateau_patience": 0, "plateau_factor": 0.5, "early_stopping_patience": 3,
                 "min_delta": 0.002}
    cfg, splits, straight, reference = straight_and_interrupted(5, tmp_path, **overrides)
    resumed = LocalSession(threads=1, checkpoint_dir=str(tmp_path))
    model = fit(cfg, PARAMS, splits, resumed)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in straight.history][2:]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history][2:]
    assert len({h["lr"] for h in straight.history}) > 1, "the plateau schedule never cut: the test proves nothing"
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_warm_up_comes_before_every_schedule():
    cfg = small_cfg(epochs=6)
    cfg.train.warmup_epochs, cfg.train.schedule, cfg.train.step_epochs, cfg.train.gamma = 2, "step", 2, 0.5
    assert [lr_factor(e, 1, cfg, True, 1e-3) for e in range(6)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimizer_steps_as_the_reference_one(name):
    """make_optimizer's fused kernels must keep every group's hyperparameters: three steps of it
    and of torch's plain per-parameter optimizer, built from the same groups, end at the same weights."""
    params = {**PARAMS, "optimizer": name, "weight_decay": 0.05}
    torch.manual_seed(0)
    fused_model = build_model("cnn_bn", 28)
    reference_model = build_model("cnn_bn", 28)
    reference_model.load_state_dict(fused_model.state_dict())
    initial = [p.detach().clone() for p in fused_model.parameters()]
    fused = make_optimizer(fused_model, params, small_cfg())
    assert all(g["fused"] for g in fused.param_groups)
    assert {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.05}  # norms and biases get none
    by_id = {id(p): i for i, p in enumerate(fused_model.parameters())}
    reference_params = list(reference_model.parameters())
    reference = type(fused)([{**{k: v for k, v in g.items() if k not in ("params", "fused")},
                              "params": [reference_params[by_id[id(p)]] for p in g["params"]]}
                             for g in fused.param_groups], fused=False)
    for _ in range(3):
        for p, q in zip(fused_model.parameters(), reference_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for p, q in zip(fused_model.parameters(), reference_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, p0) for p, p0 in zip(fused_model.parameters(), initial))  # every weight moved


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_optimizer_under_grad_scaler_skips_inf_steps(name):
    """fit's AMP sequence (scale, unscale_ for clipping, step, update) with the fused kernels, run on CPU's
    GradScaler: a finite step moves the weights, a step with inf gradients leaves them and halves the scale."""
    torch.manual_seed(0)
    model = build_model("cnn_bn", 28)
    optimizer = make_optimizer(model, {**PARAMS, "optimizer": name}, small_cfg())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))

    def step(scale_loss_by: float) -> list[torch.Tensor]:
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * scale_loss_by).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return before

    before = step(1.0)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 1024.0
    before = step(float("inf"))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 512.0


# --------------------------------------------------------------------------- under Ray Train


@pytest.mark.parametrize("gpus, backend", [(0, "gloo"), (0.5, "nccl")])
def test_building_a_trials_trainer_imports_no_torch(tmp_path, gpus, backend):
    """A TorchTrainer trial's Tune process builds the trainer and waits: it must not pay for importing
    torch (about 2 s of a trial's start-up). Checked in a fresh interpreter, as a trial starts."""
    build = f"""
import sys
import ray.train
from pneumo_ray import config, trial
from pneumo_ray.torch_trainer import torch_trainer
cfg = config.from_dict({{"resources": {{"gpus_per_worker": {gpus}, "workers_per_trial": 2}}}}, check=False)
trainer = torch_trainer(trial.train_worker, train_loop_config={{}}, scaling_config=trial.scaling_config(cfg),
                        run_config=ray.train.RunConfig(name="t", storage_path={str(tmp_path)!r}))
print(trainer.backend_config.backend, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, check=True).stdout
    assert out.split() == [backend, "False"]


def ddp_probe_worker(loop_config: dict) -> None:
    """The project's worker entry point, plus a dump of each rank's final weights for the test."""
    import ray.train

    from pneumo_ray.trial import RaySession

    cfg = config.from_dict(loop_config["cfg"])
    splits = ray.get(loop_config["splits_ref"])
    session = RaySession(threads=1)
    staging = Path(tempfile.gettempdir())  # where RaySession stages each checkpoint before Ray uploads it
    Path(loop_config["out"], f"staging{session.rank}.json").write_text(
        json.dumps({"dir": str(staging), "before": sorted(p.name for p in staging.glob("pneumo-ckpt-*"))}))
    model = fit(cfg, loop_config["params"], splits, session)
    torch.save(model.state_dict(), f"{loop_config['out']}/rank{session.rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2])  # one worker under Ray Train: every sweep test's trials
def test_loss_falls_under_ray_train(ray_session, tmp_path, workers):
    import ray.train
    from ray.train.v2.api.callback import UserCallback
    from ray.util.state import list_actors

    from pneumo_ray.torch_trainer import torch_trainer

    class RecordControllerModules(UserCallback):
        """Runs in the Train controller. Defined in this function, so it travels by value and does not
        import this test module (which imports torch) there."""

        def after_report(self, run_context, metrics, checkpoint):
            import sys

            with open(controller_modules, "a") as f:
                f.write(f"{'torch' in sys.modules}\n")

    controller_modules = str(tmp_path / "controller_modules.txt")
    cfg = small_cfg(epochs=3)
    splits = load_splits(cfg.data)
    wait_for_free_cpus(ray_session, workers)  # 2 workers take both cores of the shared Ray
    trainer = torch_trainer(
        ddp_probe_worker,
        train_loop_config={"cfg": cfg.to_dict(), "params": PARAMS, "splits_ref": ray_session.put(splits),
                           "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"ddp{workers}", storage_path=str(tmp_path / "runs"),
                                       callbacks=[RecordControllerModules()]),
    )
    result = trainer.fit()
    reports = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    assert [m["epoch"] for m in reports] == [1, 2, 3]
    # checkpoints upload in the background (ASYNC): every one is in storage when fit() returns, and its
    # staging folder is gone
    for checkpoint, _ in result.best_checkpoints:
        assert (Path(checkpoint.path) / MODEL_FILE).is_file()
    for r in range(workers):
        staging = json.loads((tmp_path / f"staging{r}.json").read_text())
        assert {p.name for p in Path(staging["dir"]).glob("pneumo-ckpt-*")} <= set(staging["before"])
    assert reports[-1]["train_loss"] < 0.7 * reports[0]["train_loss"]
    assert reports[-1]["val_auc"] > 0.8
    # Ray Train's actors in this test's job (dead ones included): the controller, and none of the three helpers a
    # local pneumo-ray run leaves out (no Ray Datasets to manage, no spot node to be preempted and no autoscaler
    # to ask for nodes on one machine)
    job = ray_session.get_runtime_context().get_job_id()
    started = {a.class_name for a in list_actors(filters=[("job_id", "=", job)], limit=10_000, detail=False)}
    assert "TrainController" in started
    assert not started & {"DatasetManager", "PreemptionWatcher", "_AutoscalingCoordinatorActor"}, started
    # the controller sets up the workers' process group without importing torch itself (torch_trainer.py)
    assert (tmp_path / "controller_modules.txt").read_text().split() == ["False"] * 3
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(workers)]
    if workers == 2:
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key]), f"DDP ranks disagree on {key}"


def test_divergence_stops_the_run_and_says_why():
    cfg = small_cfg(epochs=3)
    session = LocalSession(threads=1)
    fit(cfg, {**PARAMS, "model": "mlp", "optimizer": "sgd", "lr": 1e6}, load_splits(cfg.data), session)
    assert session.diverged and session.diverged.startswith("diverged: loss became")
    assert "lr=1e+06" in session.diverged
    assert session.history[-1]["diverged"] == 1 and len(session.history) < 3  # stopped, not run to the end
    assert all(h["diverged"] == 0 for h in session.history[:-1])
