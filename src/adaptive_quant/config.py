"""Typed configuration: one tree of pydantic models, loaded from YAML, overridable from the CLI.

Every section validates itself on construction (torchao style), so a bad value fails at
load time with a message that names the key ("config key 'train.lr': must be > 0, got -1"),
never halfway through a training run. Sections are frozen: a stage that needs other values
builds a copy (`cfg.model_copy(update={"model": pruned_model_cfg})`). The loader and its rules
(unknown keys refused, strict types, `--set` values read as YAML scalars except for text keys,
the wording of errors) are the gateway's too: adaptive_quant.core.settings. No environment
source: a run is the file plus the overrides on its command line, both recorded with it (the
gateway's AQ_* variables must not change a training run behind its back).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from adaptive_quant.core.settings import (
    ConfigError,
    FieldError,
    Section,
    SettingsRoot,
    set_path,
    split_assignment,
    text_for,
    validate,
)
from adaptive_quant.core.settings import flatten as _flatten

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ExportConfig",
    "ModelConfig",
    "PruneConfig",
    "QATConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flatten",
    "load_config",
    "parse_overrides",
]

NOUN = "config key"
# sections that configs and checkpoints written before their stage was retired still carry: dropped
# on load (with a log line), so an old checkpoint still exports. Setting one with --set is refused.
RETIRED_SECTIONS = {"predictor": "the pre-inference pixel predictor was retired"}

log = logging.getLogger(__name__)


class _Section(Section):
    config_noun: ClassVar[str] = NOUN


def _positive_entries(values: list[int]) -> list[int]:
    if not all(v > 0 for v in values):
        raise ValueError(f"entries must be > 0, got {values}")
    return values


class DataConfig(_Section):
    config_key: ClassVar[str] = "data"

    # "folder": CIFAR-10 as class folders of images (train/<class>/*.jpg, test/<class>/*.jpg)
    #           or the original python batches (data_batch_1..5, test_batch);
    # "synthetic": generated images with learnable class structure (tests, smoke runs).
    source: Literal["folder", "synthetic"] = "folder"
    root: str = "data/cifar10"
    cache_dir: str = "data/cache"  # decoded uint8 arrays (.npz), keyed by the folder's path
    # images taken out of the training set for validation (model selection, the router's fit)
    val_size: int = Field(5000, ge=0)
    # synthetic only
    synthetic_train: int = Field(2000, gt=0)
    synthetic_test: int = Field(500, gt=0)
    image_size: int = Field(32, ge=8)  # pixels; CIFAR-10 is 32×32


class ModelConfig(_Section):
    config_key: ClassVar[str] = "model"

    name: str = "cifar_resnet"  # also the prefix of the exported Triton model names
    # channels of the stem and of each of the three stages; each stage halves the resolution
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    # residual blocks (conv-bn-relu, conv-bn, +skip, relu) after each stage's downsampling conv
    blocks: list[int] = Field(default_factory=lambda: [1, 1, 1])
    num_classes: int = Field(10, ge=2)
    # logits are multiplied by this: a small value keeps early softmax soft (ResNet-9/airbench trick)
    head_scale: float = Field(0.125, gt=0)
    # "conv": a learned 3×3 conv-bn-relu stem of widths[0] channels; "whiten": airbench's fixed
    # whitening conv (whiten_kernel × whiten_kernel patches, weights from the training images'
    # patch covariance, ± each eigenvector, so widths[0] must be even and <= 2·3·k²), bias + relu
    stem: Literal["conv", "whiten"] = "conv"
    whiten_kernel: int = Field(2, ge=1)  # pixels; no padding, so the stem output is (32 - k + 1)² pixels
    # added to the patch-covariance eigenvalues before 1/sqrt (normalised units²)
    whiten_eps: float = Field(5e-4, gt=0)
    whiten_images: int = Field(5000, ge=1)  # training images whose patches give the covariance (never val/test)
    # after each stage's downsampling conv: "residual" = blocks of two convs plus a skip (ResNet);
    # "plain" = blocks of one conv-bn-relu (airbench94: conv → pool → conv per stage)
    block: Literal["residual", "plain"] = "residual"
    # channels inside each stage (empty: the stage width): a residual block's middle, or every plain
    # conv but the stage's last; set by channel pruning, which keeps the stage (skip) width apart
    inner_widths: list[int] = Field(default_factory=list)
    # PyTorch convention: weight of the new batch in the running statistics
    bn_momentum: float = Field(0.1, gt=0, le=1)
    bn_scale: bool = True  # learn BN's scale; false fixes it at 1 (airbench: the next conv rescales anyway)
    # identity (Dirac) init of each conv's first c_in filters: the net starts near a shallow one (airbench)
    dirac_init: bool = False

    @field_validator("widths")
    @classmethod
    def _four_widths(cls, v: list[int]) -> list[int]:
        if len(v) != 4:
            raise ValueError(f"needs 4 entries (stem + 3 stages), got {v}")
        return _positive_entries(v)

    @field_validator("blocks")
    @classmethod
    def _three_stages(cls, v: list[int]) -> list[int]:
        if len(v) != 3:
            raise ValueError(f"needs 3 entries (one per stage), got {v}")
        if not all(b >= 0 for b in v):
            raise ValueError(f"entries must be >= 0, got {v}")
        return v

    @field_validator("inner_widths")
    @classmethod
    def _three_inner_or_none(cls, v: list[int]) -> list[int]:
        if v and (len(v) != 3 or not all(w > 0 for w in v)):
            raise ValueError(f"needs 3 entries > 0 (one per stage) or none, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _names_triton_models(cls, v: str) -> str:
        if not v.replace("_", "").isalnum():
            raise ValueError(f"letters, digits and '_' only (it names Triton models), got {v!r}")
        return v

    @model_validator(mode="after")
    def _whitening_width(self) -> ModelConfig:
        k, w0 = self.whiten_kernel, self.widths[0]
        if self.stem == "whiten" and (w0 % 2 or w0 > 2 * 3 * k * k):  # ± each of the 3·k² eigenvectors
            raise FieldError(
                "widths[0]",
                f"with stem 'whiten' must be even and <= {2 * 3 * k * k} (± each of the 3·k² eigenvectors), got {w0}",
            )
        return self


class AugmentConfig(_Section):
    config_key: ClassVar[str] = "augment"

    crop_padding: int = Field(4, ge=0)  # pixels of reflection padding before the random 32×32 crop
    flip: bool = True  # random horizontal flip, p=0.5
    cutout: int = Field(8, ge=0)  # side of a random zeroed square in pixels; 0 disables
    # "random": each image flipped with p=0.5 every epoch; "alternate" (airbench): a random half in
    # the first float epoch, then each image flipped in every other epoch, so both views are seen
    # equally often (QAT always flips at random)
    flip_mode: Literal["random", "alternate"] = "random"
    # Gaussian pixel noise on a share of the training images, σ ~ U(0, noise_std) grey levels
    # (0..255) per image; 0 disables. The JPEG training copy has almost no high-frequency chroma,
    # so a whitening stem learns to trust directions that any camera noise fills (see
    # training/whitening.py); a little noise in training teaches the network not to
    noise_std: float = Field(0.0, ge=0, le=255)
    noise_share: float = Field(0.5, ge=0, le=1)


class TrainConfig(_Section):
    """The float (full-precision) phase."""

    config_key: ClassVar[str] = "train"

    epochs: int = Field(30, ge=0)
    batch_size: int = Field(512, gt=0)
    lr: float = Field(0.4, gt=0)  # peak learning rate of the one-cycle schedule (SGD, Nesterov)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = Field(0.2, ge=0, lt=1)  # share of steps spent ramping lr linearly to its peak
    # lr multipliers (of the peak) at the first and the last step of the one-cycle schedule
    # (0, 0: the classic triangle; airbench94: 0.2, 0.07)
    lr_start_factor: float = Field(0.0, ge=0, le=1)
    lr_end_factor: float = Field(0.0, ge=0, le=1)
    # lr multiplier for BatchNorm parameters (airbench: 64, with BN scales fixed only the shifts
    # remain and they move little at the conv lr); their weight decay is bn_weight_decay
    bn_lr_scale: float = Field(1.0, gt=0)
    bn_weight_decay: float = Field(0.0, ge=0)  # weight decay of the BN parameters (airbench: the conv's / bn_lr_scale)
    # lookahead (airbench): every lookahead_steps steps the weights are pulled to, then replaced by,
    # an exponential average whose decay grows as 0.95^5·(step/total)^3; the averaged weights are
    # the ones evaluated and kept. 0 disables.
    lookahead_steps: int = Field(0, ge=0)
    # epochs during which the whitening stem's bias is trained; frozen afterwards (airbench: 3)
    whiten_bias_epochs: int = Field(3, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    # bfloat16 autocast: the fast path on CPUs with AVX512-BF16 or AMX; fp32 otherwise
    bf16: bool = True
    channels_last: bool = True  # NHWC tensors: oneDNN's fast path for convolutions on CPU
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = all cores
    eval_batch_size: int = 1000
    max_steps_per_epoch: int = Field(0, ge=0)  # 0 = full epochs; >0 caps steps (smoke runs, quick checks)
    # seed of the initial weights, the data order and the augmentations; None = the experiment's
    # seed. The experiment's seed alone draws the validation split, so two networks trained with
    # one experiment seed and different train seeds share their validation images.
    seed: int | None = None


class QATConfig(_Section):
    """Quantization-aware fine-tuning with torchao PT2E (fake-quant, then convert to INT8)."""

    config_key: ClassVar[str] = "qat"

    enabled: bool = True
    epochs: int = Field(2, ge=0)
    lr: float = Field(0.01, gt=0)  # peak lr; the QAT phase decays it to 0 with a cosine
    batch_size: int = Field(256, gt=0)
    # epoch (0-based) from which observers stop updating scales and BN uses running statistics;
    # freezing late lets the last epoch(s) fine-tune against fixed quantization parameters
    freeze_observers_epoch: int = Field(1, ge=0)
    freeze_bn_epoch: int = Field(1, ge=0)
    max_steps_per_epoch: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _some_qat(self) -> QATConfig:
        # 0 epochs would convert observers that never saw an image: an INT8 network at chance,
        # reported as if it were a result
        if self.enabled and self.epochs == 0:
            raise ValueError("epochs must be >= 1 while qat.enabled is true; set qat.enabled=false to skip QAT")
        return self


class PruneConfig(_Section):
    """Structured (channel) pruning between the float phase and QAT: fewer filters, same layers."""

    config_key: ClassVar[str] = "prune"

    enabled: bool = False
    # share of each prunable channel group removed (stem, every stage width, every block's inner
    # width); a stage width is shared by the downsampling conv and every skip in the stage, so it
    # is ranked and cut once for all of them. The whitening stem is fixed and never pruned.
    amount: float = Field(0.25, ge=0, lt=1)
    # "l1": a channel's score is the L1 norm of the filters that produce it (summed over the convs
    # sharing it); "bn": |BN scale| / sqrt(running var + eps) (needs model.bn_scale true)
    criterion: Literal["l1", "bn"] = "l1"
    finetune_epochs: int = Field(2, ge=0)  # float (bf16) epochs after pruning, before QAT
    finetune_lr: float = Field(0.1, gt=0)  # peak lr of the fine-tune; decays to 0 with a cosine
    finetune_max_steps_per_epoch: int = Field(0, ge=0)  # 0 = full epochs


# `export.register` (a key since the first checkpoints) is also the name of ABCMeta.register, which
# every pydantic model class has; on an instance the field wins, so pydantic's warning when the
# class is made is noise, silenced there and only there
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register" in "ExportConfig" shadows', category=UserWarning)

    class ExportConfig(_Section):
        """Turning a checkpoint into a validated, profiled Triton model repository."""

        config_key: ClassVar[str] = "export"

        repository: str = "model_repository"
        # the gate: a variant more than this many accuracy points below FP32 (validation split) is refused
        max_accuracy_drop: float = Field(1.0, ge=0)
        # the same gate for an extra INT8 variant added to an existing repository (a structurally
        # pruned network, `aq-export --add-variant`), in points below that repository's FP32: pruning
        # trades some accuracy for speed on purpose, so it gets its own, wider limit
        max_pruned_accuracy_drop: float = Field(1.5, ge=0)
        # the shift check (export/shift.py): the validation split under these corruptions, on which the
        # new INT8 variant may answer at most max_shift_drop points below the INT8 of the repository it
        # replaces (or, for --add-variant, of the repository it joins); [] turns it off. 10 points is
        # far more than any clean-accuracy gain buys, and far less than the 64 points a whitening stem
        # lost under noise
        shift_corruptions: list[str] = Field(
            default_factory=lambda: ["noise", "blur", "contrast", "jpeg", "brightness"]
        )
        max_shift_drop: float = Field(10.0, ge=0)
        max_batch_size: int = Field(64, ge=1)  # Triton max_batch_size and the gateway's largest batch
        preferred_batch_sizes: list[int] = Field(default_factory=lambda: [8, 32, 64])
        max_queue_delay_us: int = Field(500, ge=0)  # Triton dynamic batching: µs a request may wait for company
        instance_count: int = Field(1, ge=1)
        instance_kind: Literal["KIND_AUTO", "KIND_CPU", "KIND_GPU"] = "KIND_AUTO"
        # "python": also write <repository>_python, the Python-backend flavour for the local Triton
        # that nvidia-pytriton ships (the production repository is always the onnxruntime one)
        triton_flavor: Literal["onnxruntime", "python"] = "onnxruntime"
        profile_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32, 64])
        profile_seconds: float = Field(1.0, gt=0)  # wall time per (variant, batch size) point
        ort_threads: int = 0  # ONNX Runtime intra-op threads while validating/profiling; 0 = all cores
        ptq_calibration_images: int = Field(512, ge=1)  # training images for the PTQ baseline's calibration
        ptq_baseline: bool = True
        register: bool = True  # register variants in the MLflow model registry
        # two-stage routing: follow-up plans measured after the INT8 entry pass on the validation split,
        # and the router predictor fitted on those outcomes (export/plans.py); written into router/1/.
        # A flipped INT8 pass is the cheap second opinion (another view at INT8's price); FP32 fails on
        # nearly the same images as INT8 (same weights), so alone it adds little, but with a flip it is
        # the most accurate plan
        router: bool = True
        plans: list[str] = Field(default_factory=lambda: ["int8:hflip", "fp32", "fp32:hflip", "int8:hflip+fp32:hflip"])
        # the cheap entry's router (`aq-fit-router --speed-entry KEY`, e.g. int8_pruned25): follow-ups of
        # the samples that entered on it. A plan over a variant the repository lacks is left out, so
        # configs/default.yaml can name a second network's (`aq-export --add-network`, e.g. "twin_int8"):
        # one that errs differently recovers more of the cheap entry's loss than the INT8 it was cut from
        speed_plans: list[str] = Field(default_factory=lambda: ["int8", "int8+int8:hflip"])

        @field_validator("profile_batch_sizes")
        @classmethod
        def _sizes(cls, v: list[int]) -> list[int]:
            if not v or not all(b >= 1 for b in v):
                raise ValueError(f"must be a non-empty list of sizes >= 1, got {v}")
            return v

        @field_validator("shift_corruptions")
        @classmethod
        def _corruptions(cls, v: list[str]) -> list[str]:
            from adaptive_quant.core.corruptions import CORRUPTIONS  # numpy and Pillow only

            unknown = [n for n in v if n not in CORRUPTIONS]
            if unknown:
                raise ValueError(f"unknown corruption(s) {unknown}; accepted: {', '.join(CORRUPTIONS)}")
            return v


class TrackingConfig(_Section):
    config_key: ClassVar[str] = "tracking"

    # None → $MLFLOW_TRACKING_URI, else a local SQLite store
    tracking_uri: str | None = None
    default_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"  # file artifact root for a local SQLite store
    experiment: str = "adaptive-quant"
    run_name: str | None = None
    enabled: bool = True


class ExperimentConfig(SettingsRoot):
    # frozen like its sections: a stage that needs other values builds a copy (model_copy(update=...))
    model_config = SettingsConfigDict(frozen=True)
    config_noun: ClassVar[str] = NOUN
    file_noun: ClassVar[str] = "config file"

    seed: int = Field(42, strict=True)
    output_dir: str = Field("runs/default", strict=True)  # checkpoints and the resolved config go here
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    qat: QATConfig = Field(default_factory=QATConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_sections(cls, data: Any) -> Any:
        if isinstance(data, dict) and RETIRED_SECTIONS.keys() & data.keys():
            for key in RETIRED_SECTIONS.keys() & data.keys():
                log.info("config section %r ignored: %s", key, RETIRED_SECTIONS[key])
            data = {k: v for k, v in data.items() if k not in RETIRED_SECTIONS}
        return data

    @model_validator(mode="after")
    def _prune_criterion_has_bn_scales(self) -> ExperimentConfig:
        # checked here, at load time, not after the float phase has run for an hour
        if self.prune.enabled and self.prune.criterion == "bn" and not self.model.bn_scale:
            raise FieldError(
                "prune.criterion",
                "'bn' ranks channels by BN scale, but model.bn_scale is false (scales fixed at 1); use 'l1'",
            )
        return self


# ---------------------------------------------------------------- building from plain data


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested plain data (a YAML file, a checkpoint's dict)."""
    return validate(ExperimentConfig, data, NOUN)


def config_to_dict(cfg: ExperimentConfig | Any) -> dict[str, Any]:
    """Plain nested data (lists, numbers, text, None): what checkpoints store and YAML dumps."""
    return cfg.model_dump(mode="json")


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """['train.epochs=5', ...] → {'train.epochs': '5'} (values read later, by each key's type)."""
    out = {}
    for item in overrides:
        key, text = split_assignment(item, "train.epochs=5")
        if key.split(".")[0] in RETIRED_SECTIONS:  # a file may still carry one; asking for one is a mistake
            raise ConfigError(f"unknown {NOUN} {key!r}: {RETIRED_SECTIONS[key.split('.')[0]]}")
        out[key] = text
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to nested plain data (a checkpoint's config), in place. The value
    is read as YAML (`5`, `0.1`, `[16, 32]`, `true`) unless the key is text, which keeps it as typed."""
    for key, text in parse_overrides(overrides).items():
        set_path(data, key, text_for(ExperimentConfig, key, text), NOUN)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The YAML file (or the defaults when path is None) under `--set` overrides, validated."""
    return ExperimentConfig.load(path, parse_overrides(overrides or []))


def flatten(data: dict[str, Any] | ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} (or the config itself) → {'train.lr': 0.1} (for MLflow params)."""
    return _flatten(data, prefix)
