"""Benchmark the gateway: routing decision time, gateway overhead, throughput (fixed vs adaptive).

A thin wrapper over `adaptive_quant.cli.bench` (installed as the console script `aq-bench` too);
`--help` explains the options.
"""

from adaptive_quant.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
