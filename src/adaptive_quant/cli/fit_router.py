"""Fit (or refit) the two-stage router of a model repository: measure its follow-up plans and fit the predictor.

  aq-fit-router --repository model_repository                    # plans from configs/default.yaml (export.plans)
  aq-fit-router --set 'export.plans=[int8:hflip,fp32:hflip]'     # another set of plans

Runs the INT8 entry pass and every pass the plans use on the *validation* split (ONNX Runtime, the
files the gateway serves), records which plans answer each sample right, fits the router's MLP
(reads the entry pass's output; 75 % fit, 25 % calibration) and writes it to <repository>/router/1/
with the plans' validation accuracy and extra cost in manifest.json. The export does the same at
the end of every export; this command refits an existing repository (e.g. after a new split or
plan set). The test split is never read: `aq-evaluate` measures the result there.

  aq-fit-router --speed-entry int8_pruned25                      # the cheap entry's router (export.speed_plans)
  aq-fit-router --speed-entry int8_pruned25 --set 'export.plans=[int8,twin_int8]'

--speed-entry KEY fits a second router, after the cheaper variant KEY (e.g. the opt-in pruned INT8):
the gateway enters on KEY for `X-Priority: speed` requests (and when the normal entry no longer fits
the budget) and escalates KEY's uncertain samples by its plans, which are export.speed_plans unless
--set export.plans=[...] names them. The main router and its plans stay as they are. Either way the
result is published as the repository's next version (a running gateway follows it).

  aq-fit-router --cross-validate 5                               # study the shipped router, write nothing

--cross-validate K refits the router K times on the validation split, each time without one fold,
and plans every held-out sample with the gateway's planner: `quality` at each candidate
`planner.quality_tie` under every budget of the report's sweep, against the best fixed variant or
plan that fits (picked in hindsight on the pooled folds, and nested: picked on the other folds,
scored on the held-out one), and balanced against the confidence rule at the same rate. It prints
both tables and the tie whose worst budget against the nested comparator is best (`--out` writes
the JSON); it writes nothing to the repository.
"""

from __future__ import annotations

import argparse
import sys

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.config import ConfigError, load_config
from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.data import DataError, Split, load_validation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", default="configs/default.yaml", help="data, seed and export.plans (default: %(default)s)"
    )
    p.add_argument("--repository", default="model_repository", help="model repository to read and extend")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--entry", default="int8", help="the entry variant the plans follow (default: %(default)s)")
    p.add_argument(
        "--speed-entry",
        default=None,
        metavar="KEY",
        help="fit the cheap entry's router after variant KEY (e.g. int8_pruned25) instead of the main one; "
        "plans: export.speed_plans, or --set export.plans=[...]",
    )
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    p.add_argument(
        "--cross-validate",
        type=int,
        default=0,
        metavar="K",
        help="K-fold cross-validation of the repository's router and quality_tie on the validation split; "
        "writes nothing (0 = off, the default: fit and write the router)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="with --cross-validate: fold assignments (seeds) to average over (default: %(default)s)",
    )
    p.add_argument("--out", default=None, help="with --cross-validate: also write the result as JSON here")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        from adaptive_quant.export.plans import fit_router

        cfg = load_config(args.config, args.overrides)
        if args.cross_validate < 0 or args.cross_validate == 1:
            raise ValueError(f"--cross-validate takes K ≥ 2 folds (or 0 for off); got {args.cross_validate}")
        val = load_validation(cfg.data, cfg.seed)  # the test split is not read at all
        if args.cross_validate:
            if args.speed_entry:
                raise ValueError("--cross-validate studies the main router; it takes no --speed-entry")
            return _cross_validate(args, val)
        plans = cfg.export.plans
        if args.speed_entry:
            # the speed router's own plans unless the command line names plans explicitly
            named = any(o.split("=", 1)[0].strip() == "export.plans" for o in args.overrides)
            plans = cfg.export.plans if named else cfg.export.speed_plans
        fit = _refit_as_new_version(args, val, plans, fit_router)
    except (ConfigError, DataError, ManifestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r, m = fit.report, fit.manifest
    entry = args.speed_entry or args.entry
    role = "speed router" if args.speed_entry else "router"
    print(
        f"\n{role}: {r.parameters} parameters, fitted on {r.n_fit} + calibrated on {r.n_calibration} validation images"
    )
    print(f"{'plan':28}{'val acc':>9}{'ECE':>8}{'fix AUROC':>11}{'confidence':>12}")
    print(f"{'none (' + entry + ' alone)':28}{fit.outcomes[:, 0].mean():>9.2%}{r.plans['none'].ece_calibrated:>8.3f}")
    for plan in [e for e in m.plans if e.entry == entry]:
        g = r.gain.get(plan.name)
        print(
            f"{plan.name:28}{plan.val_accuracy:>9.2%}{r.plans[plan.name].ece_calibrated:>8.3f}"
            f"{g.auroc_learned_gain:>11.3f}{g.auroc_confidence:>12.3f}"
        )
    written = m.speed_router if args.speed_entry else m.router
    print(f"\nwritten: {args.repository}/{written['path']} and manifest.json (plans, {role})")
    return 0


def _refit_as_new_version(args: argparse.Namespace, val: Split, plans: list[str], fit_router):  # noqa: ANN001, ANN202
    """The router is refitted into a copy of the serving version, which then becomes the next
    version: a version's files are never written over (a gateway may be serving them; they are
    hard-linked across versions), and a running gateway follows the new version by itself."""
    import tempfile
    from pathlib import Path

    from adaptive_quant.export.versions import add_serving_version, stage_serving_version

    repo = Path(args.repository)
    speed = args.speed_entry is not None
    with tempfile.TemporaryDirectory(prefix=".refit-", dir=repo.parent) as tmp:
        work = Path(tmp) / "staged"
        staged = stage_serving_version(repo, work)
        # hard links of the serving version's router (the one refitted): never written through; the
        # other router's files stay linked, unchanged
        refitted = staged.speed_router if speed else staged.router
        for key in ("path", "spec_path"):
            if refitted and refitted.get(key):
                (work / refitted[key]).unlink()
        if speed:
            fit = fit_router(work, val, plans, entry=args.speed_entry, threads=args.threads, role="speed")
            detail = f"speed router fitted after {args.speed_entry}"
        else:
            fit = fit_router(work, val, plans, entry=args.entry, threads=args.threads)
            detail = "router refitted"
        version, manifest = add_serving_version(work, repo, source="aq-fit-router", detail=detail)
    fit.manifest = manifest
    print(f"version {version} of {repo} serves with the refitted router")
    return fit


def _cross_validate(args: argparse.Namespace, val: Split) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from adaptive_quant.core.manifest import load_manifest
    from adaptive_quant.evaluation.render import render_cross_validation
    from adaptive_quant.evaluation.router_cv import PRICES, cross_validate
    from adaptive_quant.evaluation.two_stage_report import record_split
    from adaptive_quant.predictor.deferral import DeferralPredictor

    repo = Path(args.repository)
    manifest = load_manifest(repo)
    if not manifest.router:
        raise ValueError(f"{repo} has no router to cross-validate: run aq-fit-router --repository {repo} first")
    router = DeferralPredictor.load((repo / manifest.router["path"]).parent, sha256=manifest.router.get("sha256"))
    # the manifest's batch-1 p50 per variant: the budgets are multiples of the entry's, so only the ratios count
    pass_ms = {k: v.latency.at(1).p50_ms for k, v in manifest.variants.items() if v.latency is not None}
    rec = record_split(repo, val, manifest, router, pass_ms, args.threads)
    cv = cross_validate(
        rec,
        [v.key for v in manifest.served_variants()],
        folds=args.cross_validate,
        repeats=args.repeats,
        prices=PRICES,
    )
    print(render_cross_validation(cv, pass_ms[rec.entry]))
    print(
        f"\nchosen planner.quality_tie: {cv.chosen_tie:g} (the default is in core/planner.py; --set planner.quality_tie=…)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(cv), indent=2) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
