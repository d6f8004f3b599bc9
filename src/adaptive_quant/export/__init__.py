"""Checkpoint → validated, profiled Triton model repository (ONNX variants, configs, manifest).

May import: `core`, `training`, `predictor`, the package root; torch, onnx, ONNX Runtime, MLflow.
"""
