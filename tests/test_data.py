import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptive_quant.config import DataConfig
from adaptive_quant.data import (
    CIFAR10_CLASSES,
    DataError,
    load_dataset,
    load_validation,
    make_synthetic,
    read_cifar_split,
    split_indices,
)


def _write_folder(root: Path, per_class: int = 3, fmt: str = "JPEG") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.full((32, 32, 3), CIFAR10_CLASSES.index(c) * 20, np.uint8) + rng.integers(
                    0, 10, (32, 32, 3), dtype=np.uint8
                )
                path = d / f"{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
                Image.fromarray(img).save(path, format=fmt, quality=95)
                written[str(path)] = img
    return written


def test_reads_jpeg_class_folders_with_labels(tmp_path: Path) -> None:
    _write_folder(tmp_path, per_class=3)
    split = read_cifar_split(tmp_path, "train")
    assert split.images.shape == (30, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels).tolist() == [3] * 10
    # class k was written with a base grey level of 20·k: decoding kept it (JPEG error is small)
    for k in range(10):
        assert abs(split.images[split.labels == k].mean() - (20 * k + 4.5)) < 3


def test_png_folders_decode_exactly(tmp_path: Path) -> None:
    written = _write_folder(tmp_path, per_class=1, fmt="PNG")
    split = read_cifar_split(tmp_path, "test")
    first = written[str(tmp_path / "test" / "airplane" / "0000.png")]
    assert np.array_equal(split.images[0], first)


def test_cache_is_written_and_reused(tmp_path: Path) -> None:
    _write_folder(tmp_path / "d", per_class=1)
    a = read_cifar_split(tmp_path / "d", "train", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # remove the images: a second read must come from the cache
    for p in (tmp_path / "d" / "train").rglob("*.jpg"):
        p.unlink()
    b = read_cifar_split(tmp_path / "d", "train", cache_dir=tmp_path / "cache")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_reads_python_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with (base / name).open("wb") as fh:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, fh)
    train = read_cifar_split(tmp_path, "train")
    assert train.images.shape == (20, 32, 32, 3)
    # CHW row layout converted to HWC: red plane first in the file
    with (base / "data_batch_1").open("rb") as fh:
        raw = pickle.load(fh)[b"data"][0]
    assert np.array_equal(train.images[0, :, :, 0].ravel(), raw[:1024])


def test_missing_folder_names_path_and_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*class folders.*python batches"):
        read_cifar_split(tmp_path / "missing", "train")


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    _write_folder(tmp_path, per_class=1)
    for p in (tmp_path / "train" / "frog").iterdir():
        p.unlink()
    (tmp_path / "train" / "frog").rmdir()
    with pytest.raises(DataError, match=r"frog"):
        read_cifar_split(tmp_path, "train")


def test_broken_image_is_refused_with_its_path(tmp_path: Path) -> None:
    _write_folder(tmp_path, per_class=1)
    bad = tmp_path / "train" / "cat" / "0000.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot decode.*cat/0000.jpg"):
        read_cifar_split(tmp_path, "train")


def test_wrong_image_size_is_refused(tmp_path: Path) -> None:
    _write_folder(tmp_path, per_class=1)
    Image.new("RGB", (64, 64)).save(tmp_path / "train" / "dog" / "0000.jpg")
    with pytest.raises(DataError, match="64×64, expected 32×32"):
        read_cifar_split(tmp_path, "train")


def test_split_is_seeded_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(10), 100)
    tr1, va1 = split_indices(labels, 200, seed=42)
    tr2, va2 = split_indices(labels, 200, seed=42)
    _, va3 = split_indices(labels, 200, seed=7)
    assert np.array_equal(va1, va2) and np.array_equal(tr1, tr2)
    assert not np.array_equal(va1, va3)
    assert len(np.intersect1d(tr1, va1)) == 0 and len(tr1) + len(va1) == 1000
    assert np.bincount(labels[va1]).tolist() == [20] * 10


def test_val_size_too_large_is_refused() -> None:
    with pytest.raises(DataError, match="val_size"):
        split_indices(np.zeros(10, np.int64), 10, seed=0)


def test_synthetic_dataset_is_deterministic_and_learnable_shape() -> None:
    a = make_synthetic(50, seed=3)
    b = make_synthetic(50, seed=3)
    assert np.array_equal(a.images, b.images)
    ds = load_dataset(DataConfig(source="synthetic", synthetic_train=300, synthetic_test=50, val_size=60), seed=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (240, 60, 50)
    assert ds.classes == CIFAR10_CLASSES


def test_the_validation_split_alone_is_the_same_images_and_never_reads_the_test_split(tmp_path: Path, caplog) -> None:
    """aq-fit-router and scripts/diversity.py choose on validation: they load it without the test split,
    so their logs show the test split untouched, and a copy of the data without test/ serves them."""
    import logging
    import shutil

    _write_folder(tmp_path, per_class=4)
    cfg = DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "cache"), val_size=10)
    full = load_dataset(cfg, seed=3).val
    shutil.rmtree(tmp_path / "test")
    with caplog.at_level(logging.INFO, logger="adaptive_quant.data"):
        val = load_validation(cfg, seed=3)
    assert np.array_equal(val.images, full.images) and np.array_equal(val.labels, full.labels)
    assert len(val.labels) == 10 and not any("test split" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="test"):  # the full loader still needs the test split
        load_dataset(DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "other"), val_size=10), seed=3)
    synthetic = DataConfig(source="synthetic", synthetic_train=60, val_size=12)
    assert np.array_equal(load_validation(synthetic, 5).images, load_dataset(synthetic, 5).val.images)
