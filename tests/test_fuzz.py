"""Bad input at every edge of the loaders: named cases (zero-byte, truncated, CMYK, 16-bit, 1x1, huge,
non-images, symlink loops, FIFOs, unreadable files, names that are not UTF-8, odd letter cases, nested
folders; npz files of the wrong dtype, shape or labels) and seeded random ones (mutated JPEG and PNG
bytes, random arrays). Each ends in a loaded image, a skip that is counted and named, or a one-line
ConfigError (exit 2 through the CLI, before Ray). Never in a traceback."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo_ray.config import DataConfig
from pneumo_ray.data import load_splits
from pneumo_ray.errors import ConfigError
from tests.conftest import ROOT

SEED = 20261203


def image_bytes(fmt: str, size=(32, 32), mode="L", seed=0) -> bytes:
    """An image of ``size`` (width, height) in ``mode`` (L, CMYK or I;16), saved as ``fmt``."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "CMYK":
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("CMYK")
    else:
        img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: PIL reads the size before any pixel."""
    data = bytearray(image_bytes("PNG", (1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def kaggle_folder(root: Path, per_class: int = 6, class_names=("NORMAL", "PNEUMONIA")) -> Path:
    """A small readable folder set: train, val, test, each class ``per_class`` PNGs."""
    for s in ("train", "val", "test"):
        for c, name in enumerate(class_names):
            d = root / s / name
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{s}_{c}_{i}.png").write_bytes(image_bytes("PNG", seed=i + 10 * c))
    return root


def folder_cfg(root: Path, cache: Path | None = None) -> DataConfig:
    return DataConfig(source="folder", path=str(root), size=28, min_val_images=1,
                      cache_dir=str(cache) if cache else None)


def add_named_cases(d: Path) -> tuple[set[str], int]:
    """Every listed edge case into class folder ``d``: returns the names expected among the skipped
    files, and how many odd but readable images should load."""
    good = {"cmyk.jpg": image_bytes("JPEG", mode="CMYK"), "sixteen.png": image_bytes("PNG", mode="I;16"),
            "one_pixel.png": image_bytes("PNG", (1, 1)), "wide.jpg": image_bytes("JPEG", (300, 40))}
    for name, data in good.items():
        (d / name).write_bytes(data)
    jpeg, png = image_bytes("JPEG", (64, 64)), image_bytes("PNG", (64, 64))
    bad = {"zero.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "truncated.png": png[: len(png) // 2],
           "text.png": b"this is not an image\n", "bomb.png": png_claiming(40_000, 40_000),
           "html.jpeg": b"<html><body>404</body></html>"}
    for name, data in bad.items():
        (d / name).write_bytes(data)
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    os.symlink(d / "missing.png", d / "dangling.png")
    os.mkfifo(d / "fifo.jpg")  # reading it would block forever
    (d / "folder.jpg").mkdir()
    (d / "nested").mkdir()
    (d / "nested" / "inside.png").write_bytes(png)
    odd_name = os.fsdecode(b"latin1_\xe9_broken.png")  # not UTF-8: a surrogate escape in Python
    (d / odd_name).write_bytes(b"broken")
    skipped = set(bad) | {"loop_a.png", "loop_b.png", "dangling.png", "fifo.jpg", "folder.jpg", "nested",
                          "latin1_\\xe9_broken.png"}
    if os.geteuid() != 0:  # root reads any file whatever its mode
        (d / "unreadable.png").write_bytes(png)
        (d / "unreadable.png").chmod(0)
        skipped.add("unreadable.png")
    return skipped, len(good)


def skipped_names(skipped: list[str]) -> set[str]:
    return {Path(s.split(" (")[0].rstrip("/")).name for s in skipped}


@pytest.mark.parametrize("cached", [False, True])
def test_every_named_folder_case_loads_or_is_skipped_by_name(tmp_path, cached):
    root = kaggle_folder(tmp_path / "xray", class_names=("Normal", "pneumonia"))  # letter cases differ
    expected, readable = add_named_cases(root / "train" / "Normal")
    cfg = folder_cfg(root, tmp_path / "cache" if cached else None)
    splits = load_splits(cfg)
    assert skipped_names(splits.skipped_files) == expected, splits.skipped_files
    assert len(splits.train_y) + len(splits.val_y) == 12 + 12 + readable  # train+val pooled by min_val_images=1
    assert splits.train_x.shape[1:] == (28, 28) and splits.train_x.dtype == np.uint8
    if cached:  # the second load comes from the cache and reports the same skips
        assert skipped_names(load_splits(cfg).skipped_files) == expected


def test_skips_are_counted_and_named_in_the_output_through_the_cli(tmp_path):
    """The real entry point, with a config that the model check rejects after the data is read: exit 2,
    one line on stderr, and the skip line (with the non-UTF-8 name escaped) on stdout; no Ray started."""
    root = kaggle_folder(tmp_path / "xray")
    expected, _ = add_named_cases(root / "train" / "NORMAL")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{source: folder, path: '{root}', size: 28, min_val_images: 1, cache_dir: null}}\n"
                      "search: {model: [vgg16]}\n")
    run = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(config), "--storage",
                          str(tmp_path / "out"), "--address", "127.0.0.1:1"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "search.model" in run.stderr
    line = next(ln for ln in run.stdout.splitlines() if "skipped" in ln)
    assert f"skipped {len(expected)} unreadable image(s)" in line and "latin1_\\xe9_broken.png" in line


def test_a_folder_whose_every_train_image_is_broken_is_one_line(tmp_path):
    root = kaggle_folder(tmp_path / "xray")
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(b"\x89PNG broken")
    with pytest.raises(ConfigError, match=r"none of the 12 images under train/ could be read"):
        load_splits(folder_cfg(root))


def mutated(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded corruption: flipped bytes, a cut, a spliced block, or a repeated chunk."""
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for i in rng.integers(0, len(data), rng.integers(1, 20)):
            data[i] = int(rng.integers(256))
    elif kind == 1:
        data = data[: int(rng.integers(1, len(data)))]
    elif kind == 2:
        at = int(rng.integers(len(data)))
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    else:
        at, n = int(rng.integers(len(data))), int(rng.integers(1, 64))
        data[at:at] = data[at:at + n] * int(rng.integers(2, 50))
    return bytes(data)


FUZZ_FILES = 300


def test_seeded_corruptions_of_jpeg_and_png_load_or_skip(tmp_path):
    root = kaggle_folder(tmp_path / "xray")
    rng = np.random.default_rng(SEED)
    sources = [image_bytes("JPEG", (48, 40), seed=1), image_bytes("PNG", (40, 48), seed=2),
               image_bytes("JPEG", (32, 32), mode="CMYK", seed=3), image_bytes("PNG", (24, 24), mode="I;16", seed=4)]
    target = root / "train" / "PNEUMONIA"
    for i in range(FUZZ_FILES):
        (target / f"fuzz_{i:03d}{'.jpg' if i % 2 == 0 else '.png'}").write_bytes(mutated(sources[i % 4], rng))
    splits = load_splits(folder_cfg(root))
    fuzz_skipped = [s for s in splits.skipped_files if "fuzz_" in s]
    loaded = len(splits.train_y) + len(splits.val_y) - 24
    assert loaded + len(fuzz_skipped) == FUZZ_FILES and len(fuzz_skipped) == len(splits.skipped_files)
    assert 0 < len(fuzz_skipped) < FUZZ_FILES, "the corruptions should both break and spare some files"
    print(f"\n[fuzz] {FUZZ_FILES} corrupted files: {loaded} loaded, {len(fuzz_skipped)} skipped by name")


def npz(path: Path, **arrays) -> Path:
    good = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
            (("images", np.zeros((4, 8, 8), np.uint8)), ("labels", np.array([0, 1, 0, 1])))}
    np.savez(path, **{**good, **arrays})
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": np.zeros((4, 8, 8), np.float32)}, "must be uint8"),
    ({"train_images": np.zeros((4, 8, 8), np.int16)}, "must be uint8"),
    ({"train_images": np.zeros((4, 8), np.uint8)}, "must be N x H x W"),
    ({"train_images": np.zeros((4, 8, 8, 2), np.uint8)}, "must be N x H x W"),
    ({"train_images": np.zeros((4, 8, 6), np.uint8)}, "must be square"),
    ({"train_images": np.zeros((0, 8, 8), np.uint8), "train_labels": np.zeros(0, int)}, "is empty"),
    ({"train_labels": np.array([0, 1, 2, 1])}, "labels must be 0"),
    ({"train_labels": np.array([0.0, 0.7, 1.0, 1.0])}, "must be whole numbers"),
    ({"train_labels": np.array([0.0, np.nan, 1.0, 1.0])}, "must be whole numbers"),
    ({"train_labels": np.array(["0", "1", "0", "1"])}, "must be whole numbers"),
    ({"train_labels": np.array([-1, 1, 0, 1])}, "labels must be 0"),
    ({"train_labels": np.eye(2)[[0, 1, 0, 1]]}, "has 4 images but 8 labels"),
    ({"train_labels": np.array([1, 1, 1, 1])}, "holds only class"),
    ({"train_labels": np.array([{"a": 1}] * 4, dtype=object)}, "not a readable npz"),
])
def test_wrong_npz_contents_are_one_line_errors(tmp_path, arrays, message):
    path = npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as err:
        load_splits(DataConfig(source="npz", path=str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x93NUMPY not really"])
def test_files_that_are_not_npz_are_one_line_errors(tmp_path, content):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not a readable npz"):
        load_splits(DataConfig(source="npz", path=str(path)))


NPZ_FUZZ = 200


def random_npz_arrays(rng: np.random.Generator) -> dict:
    """A valid npz's arrays with 0-3 seeded changes: some keep it valid (float labels 0.0/1.0, another
    image side), most do not."""
    arrays = {}
    for s in ("train", "val", "test"):
        n = int(rng.integers(4, 9))
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{s}_labels"] = np.array([0, 1] * (n // 2) + [1] * (n % 2))
    for _ in range(int(rng.integers(0, 4))):
        key = str(rng.choice(sorted(arrays)))
        a = arrays[key]
        change = int(rng.integers(6))
        if change == 0:
            arrays[key] = a.astype([np.uint8, np.int16, np.float32, np.float64, np.bool_][rng.integers(5)])
        elif change == 1:
            arrays[key] = a.reshape(-1) if a.ndim > 1 else a[:, None]
        elif change == 2 and key.endswith("images"):
            side = int(rng.integers(1, 12))
            arrays[key] = rng.integers(0, 256, (len(a), side, side), dtype=np.uint8)
        elif change == 3 and key.endswith("labels"):
            arrays[key] = rng.choice([0, 1, 2, -1, 0.5, np.nan], size=len(a), p=[.4, .4, .05, .05, .05, .05])
        elif change == 4:
            arrays[key] = a[: int(rng.integers(0, len(a) + 1))]
        elif change == 5 and rng.random() < 0.3:
            del arrays[key]
    return arrays


def test_seeded_random_npz_files_load_or_fail_in_one_line(tmp_path):
    rng = np.random.default_rng(SEED)
    outcomes = {"loaded": 0, "ConfigError": 0}
    for i in range(NPZ_FUZZ):
        path = tmp_path / f"fuzz_{i}.npz"
        np.savez(path, **random_npz_arrays(rng))
        try:
            splits = load_splits(DataConfig(source="npz", path=str(path)))
            assert set(np.unique(splits.train_y)) <= {0, 1} and splits.train_x.dtype == np.uint8
            outcomes["loaded"] += 1
        except ConfigError as err:
            assert "\n" not in str(err)
            outcomes["ConfigError"] += 1
    assert sum(outcomes.values()) == NPZ_FUZZ and outcomes["ConfigError"] > 0 and outcomes["loaded"] > 0
    print(f"\n[fuzz] {NPZ_FUZZ} random npz files: {outcomes}")


def break_experiment(exp: Path, case: str) -> None:
    """One way a copied experiment folder can be broken or foreign."""
    import json
    import shutil

    rank1 = sorted((exp / "best").glob("rank1_*"))[0]
    if case == "leaderboard.json not JSON":
        (exp / "leaderboard.json").write_text("{not json")
    elif case == "leaderboard.json of something else":
        (exp / "leaderboard.json").write_text(json.dumps([{"row": "1"}, "x"]))
    elif case == "model.pt truncated":
        model = next(rank1.rglob("model.pt"))
        model.write_bytes(model.read_bytes()[:100])
    elif case == "meta.json missing":
        for meta in rank1.rglob("meta.json"):
            meta.unlink()
    elif case == "best/ gone":
        shutil.rmtree(exp / "best")
    elif case == "evaluation.json without settings":
        (exp / "evaluation.json").write_text("{}")
    elif case == "pneumo_config.yaml garbage":
        (exp / "pneumo_config.yaml").write_text("data: [unclosed\n  - {")
    elif case == "leaderboard.md is a folder":
        (exp / "leaderboard.md").unlink()
        (exp / "leaderboard.md").mkdir()


BROKEN = {  # case -> the commands that read what it breaks, so must fail (exit 2); the rest may succeed
    "leaderboard.json not JSON": {"predict"},
    "leaderboard.json of something else": {"predict"},
    "model.pt truncated": {"predict"},
    "meta.json missing": {"predict"},
    "best/ gone": {"predict"},
    "evaluation.json without settings": {"predict"},
    "pneumo_config.yaml garbage": {"report"},
    "leaderboard.md is a folder": {"leaderboard"},
}
# `report` re-ranks the kept trials from their own folders and rewrites best/ and the leaderboard files,
# so it repairs what these cases break: afterwards `predict` works again.
# The check runs on two of them (each takes a full report): the lost folder and the corrupt file inside one.
REPAIRED_BY_REPORT = {"model.pt truncated", "best/ gone"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_experiment_folders_are_one_line_errors(smoke_experiment, tmp_path, capsys, case):
    import shutil

    from pneumo_ray import cli

    exp = tmp_path / "exp"
    shutil.copytree(smoke_experiment[0], exp)
    break_experiment(exp, case)
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes("PNG", (64, 64)))
    commands = {"predict": ["predict", str(exp), str(image)], "leaderboard": ["leaderboard", str(exp)],
                "report": ["report", str(exp)]}
    for name in sorted(BROKEN[case]) + sorted(set(commands) - BROKEN[case] - {"report"}):
        capsys.readouterr()
        code = cli.main(commands[name])  # an exception here is the traceback a user would see
        err = capsys.readouterr().err.strip()
        if name in BROKEN[case]:
            assert code == 2 and len(err.splitlines()) == 1 and str(exp) in err, (name, code, err)
        else:
            assert code in (0, 2) and len(err.splitlines()) <= 1, (name, code, err)
    if case in REPAIRED_BY_REPORT:
        for name in ("report", "predict"):
            capsys.readouterr()
            code = cli.main(commands[name])
            assert code == 0, (name, capsys.readouterr().err)


WRONG_VALUES = ["text", 3, 2.5, True, None, [1, "x"], {"a": 1}, [], -1, 0, [[1]], [None], float("nan")]


def config_fields(cls, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_every_config_field_given_every_wrong_type_is_a_config_error_or_accepted():
    """Each field of the config tree set to each of 13 values of the wrong type (or the wrong sign):
    it either validates (the value means something there) or is a one-line ConfigError. Never another
    exception."""
    import yaml

    from pneumo_ray import config

    base = yaml.safe_load((ROOT / "sweeps" / "configs" / "smoke.yaml").read_text())
    fields = config_fields(config.Config)
    outcomes = {"accepted": 0, "ConfigError": 0}
    for field in fields:
        *sections, key = field.split(".")
        for value in WRONG_VALUES:
            raw = yaml.safe_load(yaml.safe_dump(base))
            node = raw
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = value
            try:
                config.loads(yaml.safe_dump(raw), "fuzz.yaml")
                outcomes["accepted"] += 1
            except ConfigError as err:
                assert "\n" not in str(err), (field, value)
                outcomes["ConfigError"] += 1
    assert len(fields) > 60 and sum(outcomes.values()) == len(fields) * len(WRONG_VALUES)
    print(f"\n[fuzz] {len(fields)} config fields x {len(WRONG_VALUES)} values: {outcomes}")
