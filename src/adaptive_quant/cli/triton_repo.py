"""Write the Python-backend flavour of a model repository (for the tritonserver that nvidia-pytriton ships).

  python scripts/triton_repo.py --repository model_repository --out model_repository_python

Every served variant becomes <triton_name>/config.pbtxt (backend "python") + <N>/model.py (ONNX Runtime)
+ <N>/model.onnx (a hard link to the same file); manifest.json is copied. The production repository
(backend "onnxruntime", for NVIDIA's container) is left as it is.

A versioned repository (versions.json) gets a folder per live version (serving, canary, and any a
config.pbtxt's version_policy lists), keeps each version_policy, and copies versions.json and
manifests/. Version folders already in --out with the same bytes are left alone, so re-running it
beside a running Triton adds the new version without disturbing the ones it serves.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.export.triton_python import live_versions, write_python_flavor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--repository", default="model_repository", help="repository made by scripts/export.py (default: %(default)s)"
    )
    p.add_argument("--out", help="output folder (default: <repository>_python)")
    p.add_argument(
        "--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per model instance (default: %(default)s)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else Path(f"{Path(args.repository).resolve()}_python")
    try:
        dst = write_python_flavor(args.repository, out, intra_op_threads=args.intra_op_threads)
    except (ManifestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"python flavour written to {dst} (versions: {', '.join(str(n) for n in live_versions(dst))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
