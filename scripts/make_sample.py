"""Write a small classify request (data/sample.json) from CIFAR-10 test images, one per class.

A thin wrapper over `adaptive_quant.cli.make_sample` (installed as the console script `aq-make-sample` too);
`--help` explains the options.
"""

from adaptive_quant.cli.make_sample import main

if __name__ == "__main__":
    raise SystemExit(main())
