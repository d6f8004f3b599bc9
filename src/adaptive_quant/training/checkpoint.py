"""Checkpoints: plain dicts of tensors and config, loaded with `weights_only=True` (no pickle of code).

A checkpoint holds the float weights, the QAT (fake-quant) weights and observer state, the
resolved config and the run's metrics, so export can rebuild the converted INT8 network
without retraining and without trusting arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptive_quant.config import ExperimentConfig, config_from_dict, config_to_dict
from adaptive_quant.training.model import build_model
from adaptive_quant.training.quantize import convert, prepare_qat

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The checkpoint file is missing, unreadable or of another format."""


def save_checkpoint(
    path: str | Path,
    cfg: ExperimentConfig,
    float_state: dict[str, torch.Tensor],
    qat_state: dict[str, torch.Tensor] | None,
    metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(cfg),
        "float_state": float_state,
        "qat_state": qat_state,
        "metrics": dict(metrics),
        **(extra or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a truncated "best" checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (train with scripts/train.py first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not an adaptive-quant checkpoint (format {FORMAT_VERSION})")
    return payload


def restore_float_model(payload: dict[str, Any]) -> tuple[ExperimentConfig, nn.Module]:
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model)
    model.load_state_dict(payload["float_state"])
    return cfg, model.eval()


def restore_converted_model(payload: dict[str, Any]) -> torch.fx.GraphModule:
    """Rebuild the fake-quant graph, load the QAT state (weights + observer scales), convert to INT8."""
    if payload.get("qat_state") is None:
        raise CheckpointError("checkpoint has no QAT state (was qat.enabled false?)")
    cfg, model = restore_float_model(payload)
    prepared = prepare_qat(model, cfg.data.image_size)
    prepared.load_state_dict(payload["qat_state"])
    return convert(prepared)
