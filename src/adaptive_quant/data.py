"""CIFAR-10 loading, caching, splitting and a synthetic stand-in. NumPy and Pillow only.

Images are kept as uint8 arrays of shape (N, 32, 32, 3) (HWC, RGB) and labels as int64 (N,).
Normalisation and augmentation happen later, on tensors, in the training loop.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adaptive_quant.config import DataConfig

log = logging.getLogger(__name__)

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
# per-channel statistics of the CIFAR-10 training set (RGB, on a 0..1 scale)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

LAYOUTS_ACCEPTED = (
    "accepted layouts: (1) class folders of images, <root>/train/<class>/*.jpg and "
    "<root>/test/<class>/*.jpg (PNG also read), with the ten CIFAR-10 class names; "
    "(2) the original CIFAR-10 python batches, <root>/data_batch_1..5 and <root>/test_batch "
    "(or inside <root>/cifar-10-batches-py/)"
)


class DataError(ValueError):
    """The data folder is missing or malformed; the message names the path and the accepted layouts."""


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    classes: list[str]


# ----------------------------------------------------------------------------- readers


def _decode_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    if arr.shape != (size, size, 3):
        raise DataError(f"image {path} is {arr.shape[1]}×{arr.shape[0]}, expected {size}×{size} RGB")
    return arr


def _read_class_folders(split_dir: Path, size: int) -> Split:
    if not split_dir.is_dir():
        raise DataError(f"missing folder {split_dir}; {LAYOUTS_ACCEPTED}")
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    missing = [c for c in CIFAR10_CLASSES if c not in present]
    if missing:
        raise DataError(f"{split_dir} lacks class folder(s) {missing} (found {present}); {LAYOUTS_ACCEPTED}")
    files: list[Path] = []
    labels: list[int] = []
    for class_id, name in enumerate(CIFAR10_CLASSES):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {split_dir / name} holds no images (.jpg, .png); {LAYOUTS_ACCEPTED}")
        files += found
        labels += [class_id] * len(found)
    # Pillow releases the GIL while decoding, so threads help even on 2 cores
    with ThreadPoolExecutor(max_workers=4) as pool:
        images = list(pool.map(lambda p: _decode_image(p, size), files, chunksize=256))
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds (dicts, lists, bytes, ints and NumPy
    arrays): any other global, e.g. a function a crafted file would call, is refused, so a
    batch file cannot run code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes through it; harmless
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays and lists"
            )
        return super().find_class(module, name)


def _unpickle_batch(path: Path) -> dict:
    # The CIFAR-10 python batches are pickles by format; the restricted unpickler keeps that safe.
    with path.open("rb") as fh:
        try:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
        except Exception as exc:  # pickle raises many types on bad input
            raise DataError(f"{path} is not a CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _read_python_batches(root: Path, split: str) -> Split:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle_batch(root / name)
        if b"data" not in batch or b"labels" not in batch:
            raise DataError(f"{root / name} lacks 'data'/'labels' entries; {LAYOUTS_ACCEPTED}")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows → HWC
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def detect_layout(root: Path) -> tuple[str, Path]:
    """Return ('folders' | 'batches', base path) or raise DataError naming what is accepted."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {LAYOUTS_ACCEPTED}")
    for base in (root, root / "cifar-10-batches-py"):
        if (base / "data_batch_1").is_file() and (base / "test_batch").is_file():
            return "batches", base
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "folders", root
    raise DataError(f"data folder {root} matches no known layout; {LAYOUTS_ACCEPTED}")


def read_cifar_split(root: str | Path, split: str, size: int = 32, cache_dir: str | Path | None = None) -> Split:
    """Read the 'train' or 'test' split, decoding once and caching as uint8 arrays."""
    root = Path(root)
    layout, base = detect_layout(root)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{base.resolve()}|{layout}|{split}|{size}".encode()).hexdigest()[:12]
        cache_path = Path(cache_dir) / f"cifar10_{split}_{key}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as z:
                log.info("loaded %s split from cache %s", split, cache_path)
                return Split(z["images"], z["labels"])
    log.info("decoding %s split from %s (%s layout)", split, base, layout)
    out = _read_class_folders(base / split, size) if layout == "folders" else _read_python_batches(base, split)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, images=out.images, labels=out.labels)
        tmp.replace(cache_path)  # atomic: a killed run never leaves half a cache
    return out


# ----------------------------------------------------------------------------- synthetic


def make_synthetic(n: int, seed: int, size: int = 32, num_classes: int = 10) -> Split:
    """Images with learnable class structure (a class colour and stripe pattern) under noise.

    Tests and the smoke config use it, so the pipeline can be checked without the data set.
    The noise level varies per image (σ from 5 to 110 grey levels), so some samples are easy
    and some hard, as on real data: the entry pass's confidence, and so the two-stage router,
    has something to tell apart.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    # class colours close together, and a random brightness shift per image: colour alone
    # does not give the class away, so the network must also read the stripes
    palette = np.random.default_rng(1234).uniform(105, 150, size=(num_classes, 3))  # fixed across splits
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sigma = rng.uniform(5, 110, size=n)  # grey levels
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        freq = 1 + c % 5  # stripes per image
        angle = (c // 5) * np.pi / 2 + rng.normal(0, 0.15)
        stripes = np.sin(
            2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) / size + rng.uniform(0, 2 * np.pi)
        )
        shift = rng.normal(0, 20)  # grey levels, whole image
        img = (
            palette[c][None, None, :] + shift + 30 * stripes[..., None] + rng.normal(0, sigma[i], size=(size, size, 3))
        )
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return Split(images, labels)


# ----------------------------------------------------------------------------- splitting


def split_indices(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified split of a training set into (train, val) index arrays."""
    n = labels.shape[0]
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images out of {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    val_parts = []
    # per class, a share of val_size proportional to the class's frequency (remainder to the first)
    quotas = np.floor(val_size * np.array([(labels == c).mean() for c in classes])).astype(int)
    quotas[0] += val_size - quotas.sum()
    for c, q in zip(classes, quotas):
        idx = np.flatnonzero(labels == c)
        val_parts.append(rng.permutation(idx)[:q])
    val = np.sort(np.concatenate(val_parts))
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Train/val/test splits per the config. Validation always comes out of the training set."""
    full = _training_set(cfg, seed)
    if cfg.source == "synthetic":
        test = make_synthetic(cfg.synthetic_test, seed + 1, cfg.image_size)
    else:
        test = read_cifar_split(cfg.root, "test", cfg.image_size, cfg.cache_dir)
    tr, va = split_indices(full.labels, cfg.val_size, seed)
    return Dataset(
        train=Split(full.images[tr], full.labels[tr]),
        val=Split(full.images[va], full.labels[va]),
        test=test,
        classes=list(CIFAR10_CLASSES),
    )


def load_validation(cfg: DataConfig, seed: int) -> Split:
    """The validation split alone, the same images as `load_dataset(cfg, seed).val`, without reading
    the test split at all: for the commands that choose and fit on validation (aq-fit-router, its
    cross-validation, scripts/diversity.py). Their logs then show that the test split was never read,
    and a copy of the data without its test folder is enough for them."""
    full = _training_set(cfg, seed)
    _, va = split_indices(full.labels, cfg.val_size, seed)
    return Split(full.images[va], full.labels[va])


def _training_set(cfg: DataConfig, seed: int) -> Split:
    """The whole training set (train + val, before the split)."""
    if cfg.source == "synthetic":
        return make_synthetic(cfg.synthetic_train, seed, cfg.image_size)
    return read_cifar_split(cfg.root, "train", cfg.image_size, cfg.cache_dir)
