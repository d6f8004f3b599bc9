"""Export a trained checkpoint into a Triton model repository: FP32, FP16 and INT8 (QAT) ONNX

A thin wrapper over `adaptive_quant.cli.export` (installed as the console script `aq-export` too);
`--help` explains the options.
"""

from adaptive_quant.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
