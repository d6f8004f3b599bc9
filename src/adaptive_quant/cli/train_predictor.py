"""Train the per-sample accuracy predictor for a model repository and report how good it is.

  python scripts/train_predictor.py --config configs/default.yaml --repository model_repository

Runs every served variant on the *validation* split, fits a small MLP from cheap image
features to p(correct | variant), calibrates it (Platt scaling per variant) on held-out
validation samples, saves it into the repository (accuracy_predictor/ + manifest.json), and
reports on the *test* split: AUROC at spotting each variant's errors, calibration error, and
routing points (adaptive vs random-same-mix, oracle and INT8→FP32 confidence cascade).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.config import ConfigError, load_config
from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.data import DataError
from adaptive_quant.predictor.fit import train_predictor
from adaptive_quant.tracking import name_runs_after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="the training config (data, seed, predictor.*)")
    p.add_argument("--repository", default="model_repository", help="model repository to read and extend")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--report", help="also write the full report as JSON here")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    name_runs_after(args.config, args.overrides)
    try:
        cfg = load_config(args.config, args.overrides)
        report = train_predictor(cfg, args.repository, tracking=not args.no_mlflow)
    except (ConfigError, DataError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\npredictor: {report.parameters} parameters; test split (never seen in training or calibration)")
    print(f"{'variant':8}{'error rate':>11}{'AUROC(err)':>11}{'ECE raw':>9}{'ECE cal':>9}  Platt (a, b)")
    for k in report.variant_keys:
        print(
            f"{k:8}{report.test_error_rate[k]:>11.2%}{report.auroc_error[k]:>11.3f}{report.ece_raw[k]:>9.4f}"
            f"{report.ece_calibrated[k]:>9.4f}  ({report.calibration[k][0]:.2f}, {report.calibration[k][1]:.2f})"
        )
    print(f"\nrouting on the test split (latency = manifest batch-1 p50 ms: {report.latency_ms})")
    print(f"{'strategy':16}{'param':>7}{'accuracy':>10}{'mean ms':>9}  mix")
    for p in report.routing:
        mix = " ".join(f"{k}={v:.0%}" for k, v in p.mix.items() if v > 0)
        param = "" if p.param is None else f"{p.param:g}"
        print(f"{p.strategy:16}{param:>7}{p.accuracy:>10.2%}{p.mean_ms:>9.3f}  {mix}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
