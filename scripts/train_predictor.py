"""Train the per-sample accuracy predictor for a model repository and report how good it is.

A thin wrapper over `adaptive_quant.cli.train_predictor` (installed as the console script `aq-train-predictor` too);
`--help` explains the options.
"""

from adaptive_quant.cli.train_predictor import main

if __name__ == "__main__":
    raise SystemExit(main())
