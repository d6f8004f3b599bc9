"""Train the CIFAR-10 classifier: float phase, then quantization-aware training to INT8.

  python scripts/train.py --config configs/default.yaml            # CIFAR-10, ~1 h on 2 cores
  python scripts/train.py --config configs/smoke.yaml              # synthetic images, seconds
  python scripts/train.py --config configs/default.yaml --set train.epochs=5 --set qat.epochs=1
  python scripts/train.py --config configs/default.yaml --qat-from runs/default/best.pt --set output_dir=runs/qat2

Every run is an MLflow run (default store: sqlite:///mlruns.db; MLFLOW_TRACKING_URI overrides).
The best checkpoint (by validation accuracy) lands in <output_dir>/best.pt.
"""

from __future__ import annotations

import argparse
import logging
import sys

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.config import ConfigError, load_config
from adaptive_quant.data import DataError
from adaptive_quant.tracking import name_runs_after
from adaptive_quant.training import allocator
from adaptive_quant.training.checkpoint import CheckpointError
from adaptive_quant.training.pipeline import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument(
        "--qat-from",
        metavar="CHECKPOINT",
        help="skip the float phase: run QAT from this checkpoint's float weights (same model config)",
    )
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if argv is None:  # the command line, not a caller in this process: start again with the allocator tuned
        allocator.reexec_tuned()
    setup_logging(args.log_level)
    if allocator.active():
        logging.getLogger(__name__).info("allocator: GLIBC_TUNABLES=%s (see training/allocator.py)", allocator.TUNABLES)
    name_runs_after(args.config, args.overrides)  # MLflow run names: train-<config>-<overrides>-<time>
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_training(cfg, float_checkpoint=args.qat_from)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print()
    print(f"{'':24}{'validation':>12}{'test':>10}")
    if "unpruned_val_acc" in m:
        print(f"{'FP32 before pruning':24}{m['unpruned_val_acc']:>12.2%}{'':>10}")
    print(f"{'FP32 (float)':24}{m['float_val_acc']:>12.2%}{m['fp32_test_acc']:>10.2%}")
    if "int8_test_acc" in m:
        print(f"{'INT8 (converted QAT)':24}{m['int8_val_acc']:>12.2%}{m['int8_test_acc']:>10.2%}")
    qat_min = m.get("qat_seconds", 0.0) / 60
    prune = f", pruning + fine-tune {m['prune_seconds'] / 60:.1f} min" if "prune_seconds" in m else ""
    print(
        f"\ntime: float {m['float_seconds'] / 60:.1f} min{prune}, QAT {qat_min:.1f} min, "
        f"total {m['total_seconds'] / 60:.1f} min"
    )
    print(f"checkpoint: {result.checkpoint}")
    if result.run_id:
        print(f"MLflow run: {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
