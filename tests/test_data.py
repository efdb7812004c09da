"""Every data source yields the same Splits; augmentation is batched and switchable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pneumo_ray import config
from pneumo_ray.augment import augment_batch, normalization, resize_images, resized_splits, to_float, train_batch
from pneumo_ray.config import AugmentConfig, DataConfig
from pneumo_ray.data import load_splits
from pneumo_ray.images import read_gray
from tests.conftest import SHARED_NPZ, write_npz


def assert_splits_form(splits, size):
    for name in ("train", "val", "test"):
        x, y = splits.split(name)
        assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (size, size)
        assert y.dtype == np.int64 and len(y) == len(x) and set(np.unique(y)) == {0, 1}
    assert splits.class_names == ("normal", "pneumonia")


def test_synthetic_source_is_seeded():
    cfg = DataConfig(source="synthetic", size=32, synthetic_train=40, synthetic_val=20, synthetic_test=20)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert_splits_form(a, 32)
    assert np.array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.train_x, load_splits(cfg, seed=2).train_x)


def test_npz_source(tmp_path):
    path = write_npz(tmp_path / "d.npz", n=(50, 20, 30))
    splits = load_splits(DataConfig(source="npz", path=str(path)))
    assert_splits_form(splits, 28)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (50, 20, 30)


def test_medmnist_source_reads_official_file_offline():
    if not SHARED_NPZ.is_file():
        pytest.skip(f"official PneumoniaMNIST file not found at {SHARED_NPZ}")
    splits = load_splits(DataConfig(source="medmnist", size=28, root=str(SHARED_NPZ.parent)))
    assert_splits_form(splits, 28)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (4708, 524, 624)
    assert np.bincount(splits.train_y).tolist() == [1214, 3494]


def make_kaggle_tree(root, counts, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for cls, n in zip(("NORMAL", "PNEUMONIA"), per_class):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 255, (size, size + 8), dtype=np.uint8))
                img.convert("RGB").save(folder / f"{cls.lower()}_{i}.jpeg") if i % 2 else img.save(folder / f"{i}.png")


def test_folder_source_skips_corrupt_files_and_carves_val(tmp_path, caplog):
    root = tmp_path / "chest_xray"
    make_kaggle_tree(root, {"train": (30, 50), "val": (2, 2), "test": (10, 10)})
    corrupt = root / "train" / "PNEUMONIA" / "broken.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = root / "test" / "NORMAL" / "truncated.jpeg"
    good = (root / "test" / "NORMAL" / "normal_1.jpeg").read_bytes()
    truncated.write_bytes(good[: len(good) // 3])

    cfg = DataConfig(source="folder", path=str(root), size=28, min_val_images=10, val_fraction=0.2, cache_dir=None)
    splits = load_splits(cfg, seed=0)

    assert_splits_form(splits, 28)
    assert sorted(splits.skipped_files) == sorted([str(corrupt), str(truncated)])
    assert "skipped 2 unreadable image(s)" in caplog.text
    # 80 readable train images: 16 (stratified 20%) move to val, joining the 4 original val images.
    assert len(splits.train_y) == 64 and len(splits.val_y) == 20
    assert np.bincount(splits.val_y).tolist() == [2 + 6, 2 + 10]
    assert len(splits.test_y) == 20  # the truncated test image is not among them
    again = load_splits(cfg, seed=0)
    assert np.array_equal(splits.val_x, again.val_x), "the carved val split must be reproducible"


def test_folder_cache_is_keyed_by_content_and_size_and_rebuilt_on_any_change(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="pneumo_ray")
    root, cache = tmp_path / "chest_xray", tmp_path / "cache"
    make_kaggle_tree(root, {"train": (12, 20), "test": (6, 6)})
    cfg = DataConfig(source="folder", path=str(root), size=28, min_val_images=10, cache_dir=str(cache))
    uncached = DataConfig(**{**cfg.__dict__, "cache_dir": None})

    def load_and_compare() -> list:
        caplog.clear()
        got, fresh = load_splits(cfg, seed=0), load_splits(uncached, seed=0)
        for name in ("train", "val", "test"):
            assert np.array_equal(got.split(name)[0], fresh.split(name)[0]), name
            assert np.array_equal(got.split(name)[1], fresh.split(name)[1]), name
        return sorted(cache.glob("folders/*.npz"))

    first = load_and_compare()
    assert len(first) == 1 and "from the cache" not in caplog.text
    stamp = first[0].stat().st_mtime_ns
    assert load_and_compare() == first and "from the cache" in caplog.text  # read, not decoded again
    assert first[0].stat().st_mtime_ns == stamp
    assert not list(cache.glob("folders/*.tmp*"))

    changed = root / "train" / "NORMAL" / "0.png"  # same name and size, other pixels
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(changed)
    assert len(load_and_compare()) == 2 and "from the cache" not in caplog.text
    Image.fromarray(np.full((40, 48), 9, np.uint8)).save(root / "test" / "NORMAL" / "added.png")
    assert len(load_and_compare()) == 3 and "from the cache" not in caplog.text
    (root / "test" / "NORMAL" / "added.png").unlink()  # back to the second folder: its cache is used again
    assert len(load_and_compare()) == 3 and "from the cache" in caplog.text
    (root / "test" / "PNEUMONIA" / "2.png").unlink()
    assert len(load_and_compare()) == 4 and "from the cache" not in caplog.text
    # another size is another cache
    assert load_splits(DataConfig(**{**cfg.__dict__, "size": 32}), seed=0).image_size == 32
    assert len(sorted(cache.glob("folders/*.npz"))) == 5

    newest = max(cache.glob("folders/*.npz"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(b"not an npz")  # a damaged cache is never trusted: decoded again and replaced
    assert load_splits(DataConfig(**{**cfg.__dict__, "size": 32}), seed=0).image_size == 32
    assert "unreadable" in caplog.text and np.load(newest)["train_x"].shape[-1] == 32
    # and another resize rule: the 40 x 48 images padded to squares gain black bands the stretched ones lack
    padded = load_splits(DataConfig(**{**cfg.__dict__, "resize": "pad"}), seed=0)
    assert len(sorted(cache.glob("folders/*.npz"))) == 6
    assert padded.test_x[:, :2].max() == 0 and load_splits(cfg, seed=0).test_x[:, :2].max() > 0


def test_augmentation_is_batched_and_switchable():
    gen = torch.Generator().manual_seed(0)
    x = to_float(torch.randint(0, 255, (16, 28, 28), dtype=torch.uint8), 0.5, 0.25, normalize=True)
    off = AugmentConfig(rotation_deg=0, hflip=False, crop="none")
    assert torch.equal(augment_batch(x, off, gen), x)
    flip_only = AugmentConfig(rotation_deg=0, hflip=True, crop="none")
    out = augment_batch(x, flip_only, gen)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(16)]
    unchanged = [torch.equal(out[i], x[i]) for i in range(16)]
    assert all(f or u for f, u in zip(flipped, unchanged)) and any(flipped) and any(unchanged)
    for crop in ("pad", "resized"):
        full = augment_batch(x, AugmentConfig(crop=crop), gen)
        assert full.shape == x.shape and torch.isfinite(full).all()
        assert not torch.allclose(full, x)


def test_normalisation_uses_train_statistics_or_the_chosen_constants():
    cfg = DataConfig(source="synthetic", synthetic_train=64, synthetic_val=16, synthetic_test=16)
    splits = load_splits(cfg)
    mean, std = normalization("train", splits)
    x = to_float(torch.from_numpy(splits.train_x), mean, std, normalize=True)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    assert normalization("half", splits) == (0.5, 0.5) and normalization("imagenet", splits) == (0.449, 0.226)
    off = AugmentConfig(rotation_deg=0, hflip=False, crop="none", normalize="none")
    raw = train_batch(torch.from_numpy(splits.train_x[:8]), *normalization("none", splits), off)
    assert torch.equal(raw, to_float(torch.from_numpy(splits.train_x[:8]), 0, 1, normalize=False))  # [0, 1], as read
    half = train_batch(torch.from_numpy(splits.train_x[:8]), 0.5, 0.5, off)
    assert torch.allclose(half, raw * 2 - 1)  # torchvision's Normalize((0.5,), (0.5,)): [-1, 1]
    # Configs written when normalize was true/false still load, as the rule they meant.
    assert AugmentConfig(normalize=True).normalize == "train" and AugmentConfig(normalize=False).normalize == "none"
    assert config.from_dict({"augment": {"normalize": False}}).augment.normalize == "none"


def geometry_off(**changes) -> AugmentConfig:
    return AugmentConfig(**{"rotation_deg": 0, "hflip": False, "crop": "none", **changes})


def test_shear_keeps_the_centre_row_and_slants_the_rest():
    # An odd side puts the centre row on a pixel, which an x-shear about the centre leaves where it is.
    x = torch.zeros(4, 1, 29, 29)
    x[:, :, :, 14] = 1.0  # a vertical line through the centre
    out = augment_batch(x, geometry_off(shear_deg=30), torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :, 14], x[:, :, 14], atol=1e-5)
    draws = torch.Generator().manual_seed(0)
    torch.rand(4, generator=draws)  # the rotation draw comes first, even at 0 degrees
    slope = torch.tan((torch.rand(4, generator=draws) * 2 - 1) * torch.pi / 6)
    # The output pixel that samples the line in the top row: x_in = x_out + slope * y_out = 0 (grid units).
    expected = ((slope * 28 / 29 + 1) * 29 - 1) / 2
    columns = out[:, 0, 0].argmax(dim=-1)  # where the line crosses the top row
    assert ((columns - expected).abs() <= 1).all(), (columns, expected)
    assert len(set(columns.tolist())) > 1  # slanted, by each image's own angle


def test_zoom_scales_about_the_centre_by_the_drawn_factor():
    size, radius = 31, 6.0
    yy, xx = torch.meshgrid(torch.arange(size) - 15.0, torch.arange(size) - 15.0, indexing="ij")
    disc = ((yy ** 2 + xx ** 2) <= radius ** 2).float().expand(16, 1, size, size)
    out = augment_batch(disc, geometry_off(zoom=0.4), torch.Generator().manual_seed(1))
    draws = torch.Generator().manual_seed(1)
    torch.rand(16, generator=draws)  # the rotation draw comes first, even at 0 degrees
    factor = 1 - 0.4 + 0.8 * torch.rand(16, generator=draws)
    area = (out > 0.5).sum(dim=(1, 2, 3)).float()
    assert (out[:, 0, 15, 15] == 1).all()  # the centre stays
    # The grid samples a (factor x side) window: the disc's area scales as 1 / factor^2.
    expected = (disc[0] > 0.5).sum() / factor ** 2
    assert torch.allclose(area, expected, rtol=0.2), (area, expected)
    assert area[factor.argmin()] > area[factor.argmax()]


def test_brightness_and_contrast_jitter_scale_the_image_within_their_range():
    gray = torch.full((64, 1, 8, 8), 0.5)
    bright = augment_batch(gray, geometry_off(brightness=0.4), torch.Generator().manual_seed(0))
    per_image = bright.amax(dim=(1, 2, 3))
    assert torch.equal(bright.amin(dim=(1, 2, 3)), per_image)  # one factor per image
    assert 0.5 * 0.6 - 1e-6 <= per_image.min() < 0.45 and 0.55 < per_image.max() <= 0.5 * 1.4 + 1e-6
    assert augment_batch(torch.ones(4, 1, 8, 8), geometry_off(brightness=0.9)).max() <= 1  # clamped

    halves = torch.cat([torch.full((64, 1, 8, 4), 0.25), torch.full((64, 1, 8, 4), 0.75)], dim=-1)
    out = augment_batch(halves, geometry_off(contrast=0.5), torch.Generator().manual_seed(0))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.full((64,), 0.5))  # blended with the mean gray
    spread = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert 0.5 * 0.5 - 1e-6 <= spread.min() < 0.45 and 0.55 < spread.max() <= 0.5 * 1.5 + 1e-6
    unchanged = geometry_off()
    assert torch.equal(augment_batch(halves, unchanged, torch.Generator().manual_seed(0)), halves)


def test_read_gray_scales_16_bit_images_and_center_crops(tmp_path):
    # A 12-bit ramp stored as 16-bit, as DICOM exports often are: convert("L") alone would clip it to white.
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    img = read_gray(path, 64)
    assert img.min() <= 2 and img.max() >= 253 and np.all(np.diff(img[0].astype(int)) >= 0)

    # A wide image: black side bands around a white centred square. The centre crop keeps only the square,
    # as MedMNIST made PneumoniaMNIST; the folder source's stretch keeps the bands.
    wide = np.zeros((40, 120), np.uint8)
    wide[:, 40:80] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    assert read_gray(path, 20, "crop").min() == 255
    stretched = read_gray(path, 20)
    assert stretched[:, 0].max() == 0 and stretched[:, 10].min() == 255

    # Resize-and-pad: a white 120 x 40 image fits the 20 px square as 20 x 7, centred, with black above and below.
    Image.fromarray(np.full((40, 120), 255, np.uint8)).save(path)
    padded = read_gray(path, 20, "pad")
    assert padded[:6].max() == 0 and padded[13:].max() == 0 and padded[7:12].min() == 255


def test_a_models_own_size_is_made_from_the_loaded_images_and_kept_per_process():
    """models.<label>.size: the sweep loads once, at the largest size, and each smaller model's images are made
    from those (antialiased), every split and the CV folds carried over; each size is made once per process."""
    cfg = DataConfig(source="synthetic", size=64, synthetic_train=40, synthetic_val=20, synthetic_test=20, cv_folds=2)
    splits = load_splits(cfg, seed=0)
    small = resized_splits(splits, 32)
    assert small.image_size == 32 and resized_splits(splits, 32) is small and resized_splits(splits, 64) is splits
    for name in ("train", "val", "test"):
        x, y = small.split(name)
        assert x.dtype == np.uint8 and x.shape == (len(splits.split(name)[1]), 32, 32)
        np.testing.assert_array_equal(y, splits.split(name)[1])
    np.testing.assert_array_equal(small.folds, splits.folds)
    # as PIL resizes (bilinear, antialiased), which is how the folder source makes its images from files
    pil = np.stack([np.asarray(Image.fromarray(x).resize((32, 32), Image.BILINEAR)) for x in splits.test_x])
    assert np.abs(small.test_x.astype(int) - pil).max() <= 1
    flat = np.full((3, 50, 50), 77, np.uint8)
    assert (resize_images(flat, 20) == 77).all() and resize_images(flat, 50) is flat


def make_kermany_tree(root, patients, per_patient, size=28, test=(6, 6)):
    """Kermany-named X-rays: ``patients`` (normal, pneumonia) patients of ``per_patient`` images each in train,
    as IM-NNNN-MMMM (a few NORMAL2-IM-...) and personN_bacteria_M / personN_virus_M, plus a test split."""
    rng = np.random.default_rng(0)

    def save(folder, name):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / name)

    for p in range(patients[0]):
        for k in range(per_patient):
            save(root / "train" / "NORMAL", f"{'NORMAL2-' if p % 4 == 0 else ''}IM-{p:04d}-{k + 1:04d}.jpeg")
    for p in range(patients[1]):
        for k in range(per_patient):
            save(root / "train" / "PNEUMONIA", f"person{p}_{'virus' if k % 2 else 'bacteria'}_{100 * p + k}.jpeg")
    for cls, n in zip(("NORMAL", "PNEUMONIA"), test):
        for i in range(n):
            save(root / "test" / cls, f"test_{i}.png")


def test_patient_ids_follow_kermany_names():
    from pneumo_ray.folds import patient_ids

    names = ["person12_bacteria_3.jpeg", "person12_virus_9.jpeg", "person1_virus_2.jpeg", "IM-0115-0001.jpeg",
             "IM-0115-0002.jpeg", "NORMAL2-IM-0115-0001.jpeg", "scan.png", "IM-scan.png"]
    assert patient_ids(names).tolist() == ["person12", "person12", "person1", "IM-0115", "IM-0115",
                                           "NORMAL2-IM-0115", "scan.png", "IM-scan.png"]


@pytest.mark.parametrize("cv_folds", [0, 3])
def test_folder_val_and_folds_keep_each_patient_on_one_side(tmp_path, cv_folds):
    """A patient's X-rays on both sides of val would grade models on patients they trained on; split_by: patient
    (the default) keeps them together, split_by: image is the plain stratified split, which here leaks."""
    from sklearn.model_selection import train_test_split

    from pneumo_ray.data import folder_files
    from pneumo_ray.folds import patient_ids

    root = tmp_path / "chest_xray"
    make_kermany_tree(root, patients=(20, 30), per_patient=4)
    by_patient = DataConfig(source="folder", path=str(root), size=28, min_val_images=10, val_fraction=0.2,
                            cache_dir=None, cv_folds=cv_folds)
    by_image = DataConfig(**{**by_patient.__dict__, "split_by": "image"})
    splits, plain = load_splits(by_patient, seed=0), load_splits(by_image, seed=0)
    assert_splits_form(splits, 28)
    assert plain.patients is None and len(splits.patients) == len(splits.pool()[1]) == 200
    assert len(np.unique(splits.patients)) == 50 and "each of 50 patients on one side of val" in splits.summary()

    train_patients = set(splits.patients[: len(splits.train_y)])
    val_patients = set(splits.patients[len(splits.train_y):])
    assert not train_patients & val_patients, "a patient on both sides of val"
    assert len(val_patients) == 10 and len(splits.val_y) == 40, "a fifth of the patients, every image of each"
    assert np.bincount(splits.val_y).tolist() == [16, 24], "stratified: val's classes in train's proportion"
    # split_by: image is the stratified image split data.split_by replaced, which puts patients on both sides
    files = folder_files(root)[0]["train"]
    labels, ids = np.array([label for _, label in files]), patient_ids([path.name for path, _ in files])
    kept, carved = train_test_split(np.arange(200), test_size=0.2, stratify=labels, random_state=0)
    assert np.array_equal(plain.val_x, np.stack([read_gray(files[i][0], 28, "stretch") for i in carved]))
    assert np.array_equal(plain.val_y, labels[carved]) and len(set(ids[kept]) & set(ids[carved])) > 5

    if cv_folds:
        assert splits.cv_folds == plain.cv_folds == 3
        assert len(set(zip(splits.patients, splits.folds))) == 50, "a patient's X-rays in two folds"
        for label in (0, 1):
            assert np.bincount(splits.folds[splits.pool()[1] == label]).min() > 0
