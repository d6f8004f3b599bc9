"""The per-sample accuracy predictor: `runtime` (NumPy/ONNX Runtime, what serving imports) and
`fit`/`model` (what export uses to train and write it). May import: `core`; `fit` also `training`, `export`.
"""
