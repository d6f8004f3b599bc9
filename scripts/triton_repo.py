"""Write the Python-backend flavour of a model repository (for the tritonserver that nvidia-pytriton ships).

A thin wrapper over `adaptive_quant.cli.triton_repo` (installed as the console script `aq-triton-repo` too);
`--help` explains the options.
"""

from adaptive_quant.cli.triton_repo import main

if __name__ == "__main__":
    raise SystemExit(main())
