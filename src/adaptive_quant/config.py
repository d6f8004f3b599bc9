"""Typed configuration: one tree of dataclasses, loaded from YAML, overridable from the CLI.

Every section validates itself on construction (torchao style), so a bad value fails at
load time with a message that names the key, never halfway through a training run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    # "folder": CIFAR-10 as class folders of images (train/<class>/*.jpg, test/<class>/*.jpg)
    #           or the original python batches (data_batch_1..5, test_batch);
    # "synthetic": generated images with learnable class structure (tests, smoke runs).
    source: Literal["folder", "synthetic"] = "folder"
    root: str = "data/cifar10"
    cache_dir: str = "data/cache"  # decoded uint8 arrays (.npz), keyed by the folder's path
    val_size: int = 5000  # images taken out of the training set for validation (model selection, predictor)
    # synthetic only
    synthetic_train: int = 2000
    synthetic_test: int = 500
    image_size: int = 32  # pixels; CIFAR-10 is 32×32

    def __post_init__(self) -> None:
        _check(self.val_size >= 0, "data.val_size", f"must be >= 0, got {self.val_size}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(self.synthetic_train > 0, "data.synthetic_train", "must be > 0")
        _check(self.synthetic_test > 0, "data.synthetic_test", "must be > 0")


@dataclass
class ModelConfig:
    name: str = "cifar_resnet"  # also the prefix of the exported Triton model names
    # channels of the stem and of each of the three stages; each stage halves the resolution
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    # residual blocks (conv-bn-relu, conv-bn, +skip, relu) after each stage's downsampling conv
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    num_classes: int = 10
    # logits are multiplied by this: a small value keeps early softmax soft (ResNet-9/airbench trick)
    head_scale: float = 0.125

    def __post_init__(self) -> None:
        _check(len(self.widths) == 4, "model.widths", f"needs 4 entries (stem + 3 stages), got {self.widths}")
        _check(all(w > 0 for w in self.widths), "model.widths", "entries must be > 0")
        _check(len(self.blocks) == 3, "model.blocks", f"needs 3 entries (one per stage), got {self.blocks}")
        _check(all(b >= 0 for b in self.blocks), "model.blocks", "entries must be >= 0")
        _check(self.num_classes >= 2, "model.num_classes", "must be >= 2")
        _check(self.head_scale > 0, "model.head_scale", "must be > 0")
        _check(
            self.name.replace("_", "").isalnum(), "model.name", "letters, digits and '_' only (it names Triton models)"
        )


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # pixels of reflection padding before the random 32×32 crop
    flip: bool = True  # random horizontal flip, p=0.5
    cutout: int = 8  # side of a random zeroed square in pixels; 0 disables

    def __post_init__(self) -> None:
        _check(self.crop_padding >= 0, "augment.crop_padding", "must be >= 0")
        _check(self.cutout >= 0, "augment.cutout", "must be >= 0")


@dataclass
class TrainConfig:
    """The float (full-precision) phase."""

    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.4  # peak learning rate of the one-cycle schedule (SGD, Nesterov)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2  # share of steps spent ramping lr linearly from 0 to its peak
    label_smoothing: float = 0.2
    # bfloat16 autocast: ~2.3× faster on CPUs with AVX512-BF16 (measured); fp32 otherwise
    bf16: bool = True
    channels_last: bool = True  # NHWC tensors: oneDNN's fast path for convolutions on CPU
    threads: int = 0  # torch intra-op threads; 0 = all cores
    eval_batch_size: int = 1000
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 caps steps (smoke runs, quick checks)

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "train.epochs", "must be >= 0")
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.threads >= 0, "train.threads", "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")


@dataclass
class QATConfig:
    """Quantization-aware fine-tuning with torchao PT2E (fake-quant, then convert to INT8)."""

    enabled: bool = True
    epochs: int = 2
    lr: float = 0.01  # peak lr; the QAT phase decays it to 0 with a cosine
    batch_size: int = 256
    # epoch (0-based) from which observers stop updating scales and BN uses running statistics;
    # freezing late lets the last epoch(s) fine-tune against fixed quantization parameters
    freeze_observers_epoch: int = 1
    freeze_bn_epoch: int = 1
    max_steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "qat.epochs", "must be >= 0")
        _check(self.lr > 0, "qat.lr", "must be > 0")
        _check(self.batch_size > 0, "qat.batch_size", "must be > 0")
        _check(self.freeze_observers_epoch >= 0, "qat.freeze_observers_epoch", "must be >= 0")
        _check(self.freeze_bn_epoch >= 0, "qat.freeze_bn_epoch", "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, "qat.max_steps_per_epoch", "must be >= 0")


@dataclass
class ExportConfig:
    """Turning a checkpoint into a validated, profiled Triton model repository."""

    repository: str = "model_repository"
    # the gate: a variant more than this many accuracy points below FP32 (validation split) is refused
    max_accuracy_drop: float = 1.0
    max_batch_size: int = 64  # Triton max_batch_size and the gateway's largest batch
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 32, 64])
    max_queue_delay_us: int = 500  # Triton dynamic batching: µs a request may wait for company
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    # "python": also write <repository>_python, the Python-backend flavour for the local Triton
    # that nvidia-pytriton ships (the production repository is always the onnxruntime one)
    triton_flavor: Literal["onnxruntime", "python"] = "onnxruntime"
    profile_batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    profile_seconds: float = 1.0  # wall time per (variant, batch size) point
    ort_threads: int = 0  # ONNX Runtime intra-op threads while validating/profiling; 0 = all cores
    ptq_calibration_images: int = 512  # training images for the PTQ baseline's calibration
    ptq_baseline: bool = True
    register: bool = True  # register variants in the MLflow model registry

    def __post_init__(self) -> None:
        _check(self.max_accuracy_drop >= 0, "export.max_accuracy_drop", "must be >= 0 (points)")
        _check(self.max_batch_size >= 1, "export.max_batch_size", "must be >= 1")
        _check(self.max_queue_delay_us >= 0, "export.max_queue_delay_us", "must be >= 0")
        _check(self.instance_count >= 1, "export.instance_count", "must be >= 1")
        _check(
            self.instance_kind in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"),
            "export.instance_kind",
            "must be KIND_AUTO, KIND_CPU or KIND_GPU",
        )
        _check(
            bool(self.profile_batch_sizes) and all(b >= 1 for b in self.profile_batch_sizes),
            "export.profile_batch_sizes",
            "must be a non-empty list of sizes >= 1",
        )
        _check(self.profile_seconds > 0, "export.profile_seconds", "must be > 0")
        _check(self.ptq_calibration_images >= 1, "export.ptq_calibration_images", "must be >= 1")


@dataclass
class PredictorConfig:
    """The per-sample accuracy predictor: a small MLP over cheap image features."""

    hidden: list[int] = field(default_factory=lambda: [64, 32])  # a few thousand parameters
    # few epochs and strong decay: errors are rare (~10 %) and weakly tied to cheap features, so a
    # longer fit memorises the fit split (150 epochs: held-out AUROC 0.52, ECE 0.14; 10 epochs with
    # decay 0.01: AUROC 0.59-0.61, ECE 0.01, measured on the held-out validation part)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.002  # AdamW
    weight_decay: float = 0.01
    # share of the validation split held out from fitting, to fit the calibration (Platt scaling) and to
    # check calibration; the test split is never used here
    calibration_fraction: float = 0.25

    def __post_init__(self) -> None:
        _check(all(h > 0 for h in self.hidden), "predictor.hidden", "entries must be > 0")
        _check(self.epochs >= 1, "predictor.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "predictor.batch_size", "must be >= 1")
        _check(self.lr > 0, "predictor.lr", "must be > 0")
        _check(0 < self.calibration_fraction < 1, "predictor.calibration_fraction", "must be in (0, 1)")


@dataclass
class TrackingConfig:
    # None → $MLFLOW_TRACKING_URI, else a local SQLite store
    tracking_uri: str | None = None
    default_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"  # file artifact root for a local SQLite store
    experiment: str = "adaptive-quant"
    run_name: str | None = None
    enabled: bool = True


@dataclass
class ExperimentConfig:
    seed: int = 42
    output_dir: str = "runs/default"  # checkpoints and the resolved config go here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}': expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        where = f"config key '{prefix}'" if prefix else "config"
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        full = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise ConfigError(f"unknown config key(s) {full}; known keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested plain data."""
    return _build(ExperimentConfig, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to nested plain data, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value (e.g. train.epochs=5)")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(keys[: depth + 1])}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load YAML (or defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    apply_overrides(data, overrides or [])
    return config_from_dict(data)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} → {'train.lr': 0.1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
