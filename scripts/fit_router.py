"""Fit (or refit) the two-stage router of a model repository: measure its follow-up plans and fit the predictor.

A thin wrapper over `adaptive_quant.cli.fit_router` (installed as the console script `aq-fit-router` too);
`--help` explains the options.
"""

from adaptive_quant.cli.fit_router import main

if __name__ == "__main__":
    raise SystemExit(main())
