"""Start the adaptive-precision gateway (uvicorn) on a model repository.

A thin wrapper over `adaptive_quant.cli.serve` (installed as the console script `aq-serve` too);
`--help` explains the options.
"""

from adaptive_quant.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
