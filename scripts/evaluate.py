"""The Pareto report: every precision alone against adaptive routing, on the test split.

A thin wrapper over `adaptive_quant.cli.evaluate` (installed as the console script `aq-evaluate` too);
`--help` explains the options.
"""

from adaptive_quant.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
