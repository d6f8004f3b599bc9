"""Classify a file of images through the gateway and print a table.

A thin wrapper over `adaptive_quant.cli.predict` (installed as the console script `aq-predict` too);
`--help` explains the options.
"""

from adaptive_quant.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
