"""Load-test a running gateway over HTTP with real labelled images; report latency, budgets,

A thin wrapper over `adaptive_quant.cli.loadtest` (installed as the console script `aq-loadtest` too);
`--help` explains the options.
"""

from adaptive_quant.cli.loadtest import main

if __name__ == "__main__":
    raise SystemExit(main())
