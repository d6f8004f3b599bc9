"""Quantization-aware training with torchao PT2E: prepare → fine-tune → freeze → convert.

The X86 inductor quantizer gives per-channel symmetric INT8 weights and per-tensor
asymmetric UINT8 activations, the scheme ONNX Runtime's QDQ kernels run fast on x86.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

# torchao warns at import that its CUDA kernels (mxfp8, cutlass .so files) cannot load on a
# CPU-only machine; nothing here uses them, so that warning only buries real messages
_torchao_log = logging.getLogger("torchao")
_level = _torchao_log.level
_torchao_log.setLevel(logging.ERROR)
from torchao.quantization.pt2e import (  # noqa: E402
    disable_observer,
    enable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (  # noqa: E402
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

_torchao_log.setLevel(_level)

log = logging.getLogger(__name__)


def export_for_quantization(model: nn.Module, image_size: int = 32) -> torch.fx.GraphModule:
    """torch.export the float model with a dynamic batch dimension (else it is fixed to the example's)."""
    model = model.eval()
    example = (torch.randn(2, 3, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    return exported.module()


class OnnxRuntimeX86Quantizer(X86InductorQuantizer):
    """The X86 inductor recipe (UINT8 activations, per-channel INT8 weights) without conv+add fusion.

    The stock recipe leaves a convolution that feeds a residual add unquantized at its output,
    expecting Inductor's fused conv-add kernel. ONNX Runtime has no such kernel: it keeps that
    Conv in float and dequantizes its weights on every call, which made the exported INT8
    network *slower* than FP32 at batch 1. Quantizing the conv output
    instead gives ONNX Runtime a QLinearConv for every convolution and a QLinearAdd for the add.
    """

    def _annotate_qat_conv2d_bn_binary_unary(self, *args, **kwargs) -> None:  # noqa: D102
        return None

    def _annotate_qat_conv2d_bn_binary(self, *args, **kwargs) -> None:  # noqa: D102
        return None

    def _annotate_conv2d_binary_unary(self, *args, **kwargs) -> None:  # noqa: D102
        return None

    def _annotate_conv2d_binary(self, *args, **kwargs) -> None:  # noqa: D102
        return None


def make_quantizer(is_qat: bool = True) -> X86InductorQuantizer:
    quantizer = OnnxRuntimeX86Quantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=is_qat))
    return quantizer


def prepare_qat(model: nn.Module, image_size: int = 32) -> torch.fx.GraphModule:
    """Float model → fake-quantized training graph (conv-bn folding simulated, observers live)."""
    graph = export_for_quantization(copy.deepcopy(model).float(), image_size)
    prepared = prepare_qat_pt2e(graph, make_quantizer(is_qat=True))
    move_exported_model_to_train(prepared)
    return prepared


def set_qat_mode(prepared: torch.fx.GraphModule, train: bool, freeze_bn: bool, freeze_observers: bool) -> None:
    """Switch a prepared graph between train and eval, freezing BN statistics and observers when asked.

    Freezing BN = running the BN ops in inference mode (running statistics, not updated) while
    gradients still flow; PT2E graphs ignore module.train()/eval(), so the graph is rewritten.
    """
    if train and not freeze_bn:
        move_exported_model_to_train(prepared)
    else:
        move_exported_model_to_eval(prepared)
    # observers only learn scales while training and before the freeze epoch
    prepared.apply(disable_observer if (freeze_observers or not train) else enable_observer)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fake-quant graph → INT8 reference graph (quantize/dequantize ops around int8 weights).

    Works on a copy, so QAT can continue on `prepared` after a per-epoch evaluation.
    """
    converted = convert_pt2e(copy.deepcopy(prepared))
    move_exported_model_to_eval(converted)
    return converted
