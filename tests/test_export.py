"""``pneumo-ray export``: the exported file, run by its own runtime (TorchScript, onnxruntime, safetensors weights
into a rebuilt model), gives ``predict``'s probabilities, from image files read the way preprocess.json says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pneumo_ray import export
from pneumo_ray.errors import BadArgument
from pneumo_ray.models import build_model
from pneumo_ray.predict import Member, Predictor
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # each export traces the models; the ONNX exporter takes seconds per model


def run_exported(out_dir, images_u8: np.ndarray) -> np.ndarray:
    """The exported model's probabilities, through the runtime its format is made for."""
    spec = json.loads((out_dir / export.PREPROCESS_FILE).read_text())
    batch = np.ascontiguousarray(images_u8[:, None])
    if spec["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out_dir / spec["file"]))
        return session.run(["p_pneumonia"], {"image": batch})[0]
    scorer = (torch.jit.load(str(out_dir / spec["file"])) if spec["format"] == "torchscript"
              else export.load_safetensors(out_dir))
    with torch.no_grad():
        return scorer(torch.from_numpy(batch)).numpy()


def test_a_mixed_size_ensemble_exports_as_one_graph_that_predicts_as_predict_does(tmp_path):
    """Two members at different sizes (the graph resizes for the smaller one), one normalised and one not, with
    their own temperatures and flip TTA: every format's probabilities equal Predictor's within 1e-5."""
    torch.manual_seed(0)
    members = [Member(build_model("cnn_bn", 32), {"model": "cnn_bn", "image_size": 32, "mean": 0.45, "std": 0.22,
                                                  "normalize": True}, 1.0),
               Member(build_model("mlp", 20), {"model": "mlp", "image_size": 20, "mean": 0.5, "std": 0.5,
                                               "normalize": False}, 1.7)]
    for m in members:  # sharper heads: random initial weights alone give near-constant probabilities
        with torch.no_grad():
            [layer for layer in m.model.modules() if isinstance(layer, torch.nn.Linear)][-1].weight.mul_(30)
        m.model.eval()
    predictor = Predictor(members, threshold=0.42, flip_tta=True, description="two members", resize="pad")
    rng = np.random.default_rng(0)
    brightness = np.linspace(0.2, 1.0, 6)[:, None, None]
    images = (rng.integers(0, 256, (6, 32, 32)) * brightness).astype(np.uint8)
    expected = predictor.probabilities(images)
    assert expected.std() > 0.02, "the members must give different probabilities for the check to mean anything"

    scorer = export.Scorer(predictor.members, predictor.flip_tta)
    for fmt in export.FORMATS:
        out = tmp_path / fmt
        out.mkdir()
        export.write(scorer, fmt, out)
        (out / export.PREPROCESS_FILE).write_text(json.dumps(export.preprocess_spec(predictor, fmt, {})))
        got = run_exported(out, images)
        assert got.shape == (6,) and np.abs(got - expected).max() < 1e-5, (fmt, got, expected)
        assert np.abs(run_exported(out, images[:1]) - expected[:1]).max() < 1e-5, f"{fmt}: batch size is not fixed"


def test_export_of_the_smoke_sweep_round_trips_from_image_files(smoke_experiment, tmp_path):
    """benchmarks/export_roundtrip.py on the smoke sweep: its test images as PNG files, read only as preprocess.json
    says (PIL), each format in its own runtime: predict's probabilities and labels, for rank 1 and the ensemble."""
    exp, _ = smoke_experiment
    script = ROOT / "benchmarks" / "export_roundtrip.py"
    run = subprocess.run([sys.executable, str(script), str(exp)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PNEUMO_BENCH_RESULTS": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "export_roundtrip.json").read_text())
    assert [(r["format"], r["model"]) for r in result["exports"]] == [
        ("onnx", "rank 1"), ("onnx", "ensemble"), ("torchscript", "ensemble"), ("safetensors", "rank 1")]
    board = {r["row"]: r for r in json.loads((exp / "leaderboard.json").read_text())}
    for row in result["exports"]:
        assert row["max_abs_diff"] < 1e-5 and row["labels_equal"] == row["images"] == 128, row
        assert row["members"] == (3 if row["model"] == "ensemble" else 1)
        # the exported model's labels at its threshold: the leaderboard's own test accuracy
        board_row = board["ensemble" if row["model"] == "ensemble" else "1"]
        assert row["test_accuracy"] == pytest.approx(board_row["test_acc"])

    with pytest.raises(BadArgument, match="not an empty folder"):
        export.export(exp, "onnx", tmp_path)
    with pytest.raises(BadArgument, match="--rank 9"):
        export.export(exp, "onnx", tmp_path / "new", rank=9)
    assert not (tmp_path / "new").exists()
