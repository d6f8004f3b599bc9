"""Inference backends behind the gateway: embedded ONNX Runtime, a Triton server, or Ray Serve deployments."""

from adaptive_quant.serving.backends.base import Backend, BackendError, VariantHealth, VariantUnavailable

__all__ = ["Backend", "BackendError", "VariantHealth", "VariantUnavailable", "make_backend"]


def make_backend(kind: str, repository: str, manifest, **options) -> Backend:  # noqa: ANN001
    """'embedded', 'triton' or 'ray' → an unstarted backend (imports only the one asked for)."""
    if kind == "embedded":
        from adaptive_quant.serving.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(repository, manifest, **options)
    if kind == "triton":
        from adaptive_quant.serving.backends.triton import TritonBackend

        return TritonBackend(manifest, **options)
    if kind == "ray":
        from adaptive_quant.serving.backends.ray import RayBackend

        return RayBackend(manifest, **options)
    raise ValueError(f"unknown backend {kind!r}; accepted: embedded, triton, ray")
