"""Write the network as ONNX variants that share one contract: input `images` FP32 (N, 3, 32, 32),
already normalised; output `logits` FP32 (N, 10). Only the numbers inside differ.

- FP32: the float network as trained.
- FP16: weights and compute in half precision; casts at the input and output keep the FP32
  contract, so a client never knows which variant answered.
- INT8: the converted QAT network (torchao PT2E), exported as QuantizeLinear/DequantizeLinear
  (QDQ) pairs, the form ONNX Runtime and TensorRT run as real INT8 kernels.
- INT8 PTQ: a post-training static quantization of the FP32 file by ONNX Runtime, calibrated on
  training images: the baseline QAT has to beat (reports only, not served by default).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 18


class _HalfPrecision(nn.Module):
    """FP32 in → FP16 network → FP32 out (the casts become ONNX Cast nodes at the graph edges)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _export(model: nn.Module, path: Path, image_size: int) -> Path:
    """torch.export-based ONNX export with a dynamic batch dimension, as one self-contained file."""
    example = (torch.randn(2, 3, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about decompositions it handles fine
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
        )
    onnx.checker.check_model(str(path))
    return path


def export_fp32(model: nn.Module, path: Path, image_size: int = 32) -> Path:
    return _export(model.eval().float(), path, image_size)


def export_fp16(model: nn.Module, path: Path, image_size: int = 32) -> Path:
    return _export(_HalfPrecision(copy.deepcopy(model).eval()), path, image_size)


def export_int8(converted: torch.fx.GraphModule, path: Path, image_size: int = 32) -> Path:
    """The converted PT2E graph → QDQ ONNX. (The fake-quant training graph itself does not export.)"""
    return _export(converted, path, image_size)


class _CalibrationReader:
    """Feeds calibration batches to onnxruntime.quantization (its CalibrationDataReader protocol)."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self._batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {INPUT_NAME: self._batches[self._i - 1]}

    def rewind(self) -> None:
        self._i = 0


def export_ptq_int8(fp32_path: Path, path: Path, calibration: np.ndarray) -> Path:
    """Static PTQ of the FP32 file: QDQ, per-channel INT8 weights, UINT8 activations, MinMax calibration.

    calibration: (N, 3, H, W) float32, normalised like serving inputs (a few hundred training images).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path.parent.mkdir(parents=True, exist_ok=True)
    pre = path.with_name("preprocessed.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(path),
        _CalibrationReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    pre.unlink(missing_ok=True)
    onnx.checker.check_model(str(path))
    return path


def io_signature(path: Path) -> dict[str, list[tuple[str, int, list[int | str]]]]:
    """{'inputs': [(name, onnx elem type, dims)], 'outputs': [...]} read from the ONNX file itself."""
    model = onnx.load(str(path), load_external_data=False)

    def dims(t: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]

    return {
        "inputs": [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in model.graph.input],
        "outputs": [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in model.graph.output],
    }
