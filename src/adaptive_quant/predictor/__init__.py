"""The two-stage router's predictor: `deferral` and `entry_features` (NumPy, what serving imports),
`fit_deferral` (torch, what export runs to fit it), `calibration` (NumPy: AUROC, ECE, Platt scaling).
May import: `core`; `fit_deferral` also torch.
"""
