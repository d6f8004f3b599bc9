"""The numeric precisions the service offers; one string enum used everywhere, model names included."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def rank(self) -> int:
        """Higher = more precise; `X-Min-Precision` admits variants whose rank is at least the floor's."""
        return {"int8": 0, "fp16": 1, "fp32": 2}[self.value]

    @classmethod
    def parse(cls, value: str) -> Precision:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown precision {value!r}; accepted: {', '.join(p.value for p in cls)}") from None


def triton_model_name(model_name: str, precision: Precision | str) -> str:
    """'cifar_resnet' + fp16 → 'cifar_resnet_fp16': variants are separate Triton models."""
    return f"{model_name}_{Precision(precision).value}"
