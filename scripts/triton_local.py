"""Start a local Triton (the tritonserver binary nvidia-pytriton ships) on a model repository, in one command.

A thin wrapper over `adaptive_quant.cli.triton_local` (installed as the console script `aq-triton-local` too);
`--help` explains the options.
"""

from adaptive_quant.cli.triton_local import main

if __name__ == "__main__":
    raise SystemExit(main())
