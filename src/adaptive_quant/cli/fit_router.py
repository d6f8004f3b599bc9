"""Fit (or refit) the two-stage router of a model repository: measure its follow-up plans and fit the predictor.

  aq-fit-router --repository model_repository                    # plans from configs/default.yaml (export.plans)
  aq-fit-router --set 'export.plans=[int8:hflip,fp32:hflip]'     # another set of plans

Runs the INT8 entry pass and every pass the plans use on the *validation* split (ONNX Runtime, the
files the gateway serves), records which plans answer each sample right, fits the router's MLP
(reads the entry pass's output; 75 % fit, 25 % calibration) and writes it to <repository>/router/1/
with the plans' validation accuracy and extra cost in manifest.json. The export does the same at
the end of every export; this command refits an existing repository (e.g. after a new split or
plan set). The test split is never read: `aq-evaluate` measures the result there.
"""

from __future__ import annotations

import argparse
import sys

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.config import ConfigError, load_config
from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.data import DataError, load_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="configs/default.yaml", help="data, seed and export.plans (default: %(default)s)"
    )
    p.add_argument("--repository", default="model_repository", help="model repository to read and extend")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--entry", default="int8", help="the entry variant the plans follow (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        from adaptive_quant.export.plans import fit_router

        cfg = load_config(args.config, args.overrides)
        val = load_dataset(cfg.data, cfg.seed).val
        fit = fit_router(args.repository, val, cfg.export.plans, entry=args.entry, threads=args.threads)
    except (ConfigError, DataError, ManifestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r, m = fit.report, fit.manifest
    print(
        f"\nrouter: {r.parameters} parameters, fitted on {r.n_fit} + calibrated on {r.n_calibration} validation images"
    )
    print(f"{'plan':28}{'val acc':>9}{'ECE':>8}{'fix AUROC':>11}{'confidence':>12}")
    print(
        f"{'none (' + args.entry + ' alone)':28}{fit.outcomes[:, 0].mean():>9.2%}{r.plans['none'].ece_calibrated:>8.3f}"
    )
    for entry in m.plans:
        g = r.gain.get(entry.name)
        print(
            f"{entry.name:28}{entry.val_accuracy:>9.2%}{r.plans[entry.name].ece_calibrated:>8.3f}"
            f"{g.auroc_learned_gain:>11.3f}{g.auroc_confidence:>12.3f}"
        )
    print(f"\nwritten: {args.repository}/{m.router['path']} and manifest.json (plans, router)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
