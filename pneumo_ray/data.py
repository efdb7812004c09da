"""Data sources -> one in-memory ``Splits``: uint8 images N x H x W, int64 labels, class names.

Every source (medmnist, npz, folder, synthetic) ends in the same form, so the
training loop never knows where images came from. The driver loads once and puts
``Splits`` in Ray's object store; trials read it zero-copy and never touch files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumo_ray.config import ConfigError, DataConfig
from pneumo_ray.folds import carve_val, patient_ids, with_folds
from pneumo_ray.images import IMAGE_SUFFIXES, read_gray

log = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "pneumonia")
SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple = CLASS_NAMES
    source: str = ""
    skipped_files: list = field(default_factory=list)  # unreadable images the folder source passed over
    # data.cv_folds: the fold (0..K-1) of each pooled image, the pool being train then val; None: no CV
    folds: np.ndarray | None = None
    # each pooled image's patient (train then val), which a carved val and CV folds keep on one side; None: the
    # source names no patients (npz, medmnist, synthetic), or data.split_by is image
    patients: np.ndarray | None = None

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def train_mean_std(self) -> tuple[float, float]:
        """Normalisation statistics from the train split only (val/test must not leak in)."""
        x = self.train_x.astype(np.float32) / 255.0
        return float(x.mean()), float(x.std() + 1e-6)

    @property
    def cv_folds(self) -> int:
        return 0 if self.folds is None else int(self.folds.max()) + 1

    def pool(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled images that cross-validation splits into folds: train, then val."""
        return np.concatenate([self.train_x, self.val_x]), np.concatenate([self.train_y, self.val_y])

    def fold(self, k: int) -> Splits:
        """Fold ``k`` as splits of its own: the other folds train, fold ``k`` validates, test is the same."""
        x, y = self.pool()
        held_out = self.folds == k
        return dataclasses.replace(self, train_x=x[~held_out], train_y=y[~held_out], val_x=x[held_out],
                                   val_y=y[held_out], folds=None, patients=None)

    def summary(self) -> str:
        parts = []
        for name in SPLITS:
            _, y = self.split(name)
            counts = np.bincount(y, minlength=len(self.class_names))
            parts.append(f"{name} {len(y)} ({'/'.join(str(c) for c in counts)})")
        folds = f", {self.cv_folds} CV folds over train+val" if self.folds is not None else ""
        if self.patients is not None:
            folds += f", each of {len(np.unique(self.patients))} patients on one side of val" + (
                " and of every fold" if self.folds is not None else "")
        return f"{self.source}: {self.image_size}px, " + ", ".join(parts) + f" [{'/'.join(self.class_names)}]" + folds


def load_splits(cfg: DataConfig, seed: int = 0) -> Splits:
    loaders = {"medmnist": _load_medmnist, "npz": _load_npz, "folder": _load_folder, "synthetic": _load_synthetic}
    splits = loaders[cfg.source](cfg, seed)
    check_splits(splits, where=splits.source)
    return with_folds(splits, cfg.cv_folds, seed) if cfg.cv_folds else splits


def check_splits(splits: Splits, where: str) -> None:
    for name in SPLITS:
        x, y = splits.split(name)
        if len(x) == 0:
            raise ConfigError(f"{where}: the {name} split is empty")
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ConfigError(f"{where}: {name} images must be uint8 N x H x W, got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise ConfigError(f"{where}: {name} has {len(x)} images but {len(y)} labels")
        present = np.unique(y)
        if len(present) < 2:
            raise ConfigError(f"{where}: the {name} split holds only class {present.tolist()}; "
                              "both normal (0) and pneumonia (1) are needed")
        if present.min() < 0 or present.max() >= len(splits.class_names):
            raise ConfigError(f"{where}: {name} labels must be 0 (normal) or 1 (pneumonia), got {present.tolist()}")


# --------------------------------------------------------------------------- sources


def _from_arrays(arrays, where: str) -> Splits:
    """MedMNIST npz layout: {train,val,test}_{images,labels}; labels N or N x 1."""
    out = {}
    for name in SPLITS:
        for kind in ("images", "labels"):
            if f"{name}_{kind}" not in arrays:
                raise ConfigError(f"{where}: missing array '{name}_{kind}'; a MedMNIST-format npz holds "
                                  "train/val/test _images and _labels")
        images = np.asarray(arrays[f"{name}_images"])
        if images.ndim == 4 and images.shape[-1] in (1, 3):  # N x H x W x C colour or singleton channel
            images = images.mean(axis=-1).round().astype(np.uint8) if images.shape[-1] == 3 else images[..., 0]
        if images.ndim != 3:
            raise ConfigError(f"{where}: '{name}_images' must be N x H x W grayscale, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ConfigError(f"{where}: '{name}_images' must be uint8, got {images.dtype}")
        if images.shape[1] != images.shape[2]:
            raise ConfigError(f"{where}: '{name}_images' must be square, got {images.shape[1]} x {images.shape[2]}")
        labels = np.asarray(arrays[f"{name}_labels"]).reshape(-1)
        # astype(int64) alone would turn 0.7 into 0 and NaN into a huge negative number without a word
        if labels.dtype.kind not in "iub" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
            raise ConfigError(f"{where}: '{name}_labels' must be whole numbers 0 (normal) or 1 (pneumonia), "
                              f"got {labels.dtype} values such as {labels[:3].tolist()}")
        out[f"{name}_x"] = np.ascontiguousarray(images)
        out[f"{name}_y"] = labels.astype(np.int64)
    return Splits(**out, source=where)


def _load_npz(cfg: DataConfig, seed: int) -> Splits:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: npz file not found; check data.path (or --data npz:PATH)")
    try:
        with np.load(path) as arrays:
            return _from_arrays({k: arrays[k] for k in arrays.files}, str(path))
    except ConfigError:
        raise
    except Exception as err:  # zipfile/pickle errors: the file is not a readable npz
        raise ConfigError(f"{path}: not a readable npz file ({type(err).__name__}: {err})") from None


def medmnist_file(cfg: DataConfig) -> Path:
    """Where medmnist keeps PneumoniaMNIST at data.size in data.root (its own naming)."""
    return Path(cfg.root).expanduser() / f"pneumoniamnist{'' if cfg.size == 28 else f'_{cfg.size}'}.npz"


def _load_medmnist(cfg: DataConfig, seed: int) -> Splits:
    import medmnist

    expected = medmnist_file(cfg)
    root = expected.parent
    root.mkdir(parents=True, exist_ok=True)
    try:
        # download=True verifies the MD5 of a file already in root and downloads only when it is absent.
        ds = {s: medmnist.PneumoniaMNIST(split=s, root=str(root), size=cfg.size, download=True) for s in SPLITS}
    except Exception as err:
        raise ConfigError(f"{expected}: PneumoniaMNIST {cfg.size}px could not be loaded or downloaded "
                          f"({type(err).__name__}); place the official file there or set data.root") from None
    arrays = {}
    for s in SPLITS:
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = ds[s].imgs, ds[s].labels
    return _from_arrays(arrays, f"medmnist:{expected}")


def _load_folder(cfg: DataConfig, seed: int) -> Splits:
    """Kaggle chest_xray layout: {train,val,test}/{NORMAL,PNEUMONIA}/* (folder names case-insensitive).
    An entry with an image suffix that is not a regular file (a folder, a FIFO, a broken or looping
    link), and any folder nested in a class folder, is skipped and named, like an image that fails to decode."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root}: folder not found; expected {{train,val,test}}/{{NORMAL,PNEUMONIA}}/ images")
    files, unusable = folder_files(root)
    for s in ("train", "test"):
        if not files[s]:
            raise ConfigError(f"{root}: no images under {s}/NORMAL or {s}/PNEUMONIA; "
                              "expected the Kaggle chest_xray layout")

    arrays, skipped = _decoded(files, cfg)
    skipped = unusable + skipped
    for s in ("train", "test"):
        if not len(arrays[s][1]):
            raise ConfigError(f"{root}: none of the {len(files[s])} images under {s}/ could be read "
                              f"(e.g. {shown(files[s][0][0])}); replace them with readable PNG or JPEG files")

    passed_over = set(skipped)
    patients = ({s: patient_ids([p.name for p, _ in files[s] if shown(p) not in passed_over]) for s in ("train", "val")}
                if cfg.split_by == "patient" else None)
    if len(arrays["val"][1]) < cfg.min_val_images:
        # Kaggle's val split has 16 images: too few to select models on. Carve a stratified one from train.
        tx, ty = arrays["train"]
        vx, vy = arrays["val"]
        keep, carved = carve_val(ty, None if patients is None else patients["train"], cfg.val_fraction, seed)
        arrays["train"] = (tx[keep], ty[keep])
        arrays["val"] = (np.concatenate([vx, tx[carved]]), np.concatenate([vy, ty[carved]]))
        if patients is not None:
            patients = {"train": patients["train"][keep],
                        "val": np.concatenate([patients["val"], patients["train"][carved]])}

    if skipped:
        log.warning("skipped %d unreadable image(s): %s%s", len(skipped), ", ".join(skipped[:10]),
                    " ..." if len(skipped) > 10 else "")
    return Splits(*arrays["train"], *arrays["val"], *arrays["test"], source=f"folder:{root}", skipped_files=skipped,
                  patients=None if patients is None else np.concatenate([patients["train"], patients["val"]]))


def folder_files(root: Path) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """split -> [(image file, class index)] under the Kaggle layout, and the entries that cannot be images."""
    files: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    unusable: list[str] = []
    for split_dir in _entries(root):
        if split_dir.name.lower() not in SPLITS or not split_dir.is_dir():
            continue
        for class_dir in _entries(split_dir):
            name = class_dir.name.lower()
            if class_dir.is_dir() and name in CLASS_NAMES:
                for p in _entries(class_dir):
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                        files[split_dir.name.lower()].append((p, CLASS_NAMES.index(name)))
                    elif p.suffix.lower() in IMAGE_SUFFIXES or p.is_dir():
                        unusable.append(shown(p) + ("/ (a nested folder)" if p.is_dir() else " (not a regular file)"))
    return files, unusable


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise ConfigError(f"{shown(folder)}: cannot list this folder ({err.strerror or type(err).__name__}); "
                          "check its permissions") from None


def shown(path: Path) -> str:
    """A path as it can be printed: a name that is not valid UTF-8 shows its odd bytes as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _decode(files: dict[str, list[tuple[Path, int]]], size: int, resize: str) -> tuple[dict, list[str]]:
    """Every listed image read at ``size`` px: split -> (images, labels), and the files that failed."""
    from concurrent.futures import ThreadPoolExecutor

    def read(item):
        try:
            return read_gray(item[0], size, resize)
        except Exception:
            return None

    skipped: list[str] = []
    arrays = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:  # PIL decode frees the GIL
        for s in SPLITS:
            images = list(pool.map(read, files[s]))
            ok = [i for i, img in enumerate(images) if img is not None]
            skipped += [shown(files[s][i][0]) for i, img in enumerate(images) if img is None]
            arrays[s] = (np.stack([images[i] for i in ok]) if ok else np.zeros((0, size, size), np.uint8),
                         np.array([files[s][i][1] for i in ok], dtype=np.int64))
    return arrays, skipped


def files_digest(files: dict[str, list[tuple[Path, int]]]) -> str:
    """SHA-256 of every listed image's split, class, name and bytes: a folder dataset's identity."""
    digest = hashlib.sha256()
    for s in SPLITS:
        for path, label in files[s]:
            digest.update(f"{s}/{label}/".encode() + os.fsencode(path.name) + b"\0")
            try:
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError as err:  # unreadable now: decoding will skip it; the digest still changes once it is fixed
                digest.update(f"unreadable {err.errno}".encode())
    return digest.hexdigest()


def _content_key(files: dict[str, list[tuple[Path, int]]], size: int, resize: str) -> str:
    """The cache file's name: the folder's digest, the size and the resize rule; any change makes a new key."""
    return hashlib.sha256(f"pneumo-ray folder cache 2, {size}px, {resize}, {files_digest(files)}".encode()
                          ).hexdigest()[:32]


def _decoded(files: dict[str, list[tuple[Path, int]]], cfg: DataConfig) -> tuple[dict, list[str]]:
    """``_decode``, through the cache in data.cache_dir when there is one. A cache file that cannot be
    read is decoded again and replaced: the images are the source of truth, the cache only saves time."""
    if not cfg.cache_dir:
        return _decode(files, cfg.size, cfg.resize)
    cache = Path(cfg.cache_dir) / "folders" / f"{_content_key(files, cfg.size, cfg.resize)}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                log.info("folder images from the cache %s", cache)
                return ({s: (saved[f"{s}_x"], saved[f"{s}_y"]) for s in SPLITS},
                        [str(p) for p in saved["skipped"]])
        except Exception as err:  # truncated or foreign: decode again
            log.warning("cache %s unreadable (%s); decoding the images again", cache, type(err).__name__)
    arrays, skipped = _decode(files, cfg.size, cfg.resize)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, skipped=np.array(skipped, dtype=str),
             **{f"{s}_{k}": arrays[s][i] for s in SPLITS for i, k in enumerate("xy")})
    partial.replace(cache)  # atomic: a concurrent reader sees the old file or the whole new one
    return arrays, skipped


def make_synthetic(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 'lungs' where pneumonia adds a bright diffuse blob at a random place: learnable, not trivial."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    labels = (rng.random(n) < 0.65).astype(np.int64)  # PneumoniaMNIST-like imbalance
    images = 0.35 + 0.15 * np.sin(6 * xx)[None] + 0.15 * rng.standard_normal((n, size, size)).astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, (2, n)).astype(np.float32)
    radius = rng.uniform(0.12, 0.2, n).astype(np.float32)
    blob = np.exp(-(((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
                    / (2 * radius[:, None, None] ** 2)))
    images += 0.18 * labels[:, None, None] * blob
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels


def _load_synthetic(cfg: DataConfig, seed: int) -> Splits:
    rng = np.random.default_rng(seed)
    parts = [make_synthetic(n, cfg.size, rng) for n in (cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test)]
    return Splits(*parts[0], *parts[1], *parts[2], source="synthetic")
