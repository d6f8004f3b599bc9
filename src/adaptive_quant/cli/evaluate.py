"""The Pareto report: every precision alone against adaptive routing, on the test split.

  python scripts/evaluate.py                                   # model_repository, CIFAR-10 test split
  python scripts/evaluate.py --limit 500 --latency-iters 50    # a quick look
  python scripts/evaluate.py --checkpoint runs/default/best.pt # export a checkpoint to a temp repository first
  python scripts/evaluate.py --url http://127.0.0.1:8000 --limit 300   # a running gateway, over HTTP

Writes report.md, report.json and PNG plots (confusion matrices, accuracy vs latency and vs
throughput with the Pareto frontier marked, the budget sweep) into --out, and logs them to an
MLflow evaluation run (tracking settings from --config). Per variant (the served ones and the
PTQ INT8 baseline): accuracy, macro P/R/F1, per-class table, confusion matrix, drop vs FP32,
batch-1 latency p50/p95/p99, batch-64 throughput, file size. Adaptive routing: budgets ×
priorities through the gateway's own single-stage routing function (each variant's validation
accuracy). Baselines: each fixed variant, the oracle, the INT8→FP32 confidence cascade. With a
router in the repository, two_stage.md/json compare the two-stage router against the same.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from adaptive_quant.config import ConfigError, load_config
from adaptive_quant.core.manifest import ManifestError, load_manifest
from adaptive_quant.core.routing import Priority
from adaptive_quant.data import DataError, load_dataset
from adaptive_quant.evaluation.offline import EvalOptions, EvaluationError, evaluate_repository
from adaptive_quant.evaluation.render import log_report_to_mlflow, write_report
from adaptive_quant.tracking import name_runs_after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--repository", default="model_repository", help="model repository to evaluate (default: %(default)s)"
    )
    p.add_argument(
        "--config",
        default="configs/default.yaml",
        help="data, seed and MLflow tracking settings (default: %(default)s)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable"
    )
    p.add_argument(
        "--serve-config",
        default="configs/serve.yaml",
        help="gateway settings whose routing knobs the sweep uses, as the service would (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint",
        help="a training checkpoint (runs/<run>/best.pt): export it to a temporary repository and evaluate that",
    )
    p.add_argument("--url", help="measure a running gateway over HTTP instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--out", help="report folder (default: reports/<UTC timestamp>)")
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of N test samples")
    p.add_argument(
        "--latency-iters", type=int, default=200, help="batch-1 calls timed per variant (default: %(default)s)"
    )
    p.add_argument(
        "--throughput-seconds", type=float, default=1.0, help="s of batch-64 calls per variant (default: %(default)s)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="ONNX Runtime intra-op threads; 0 = all cores (default: %(default)s)"
    )
    p.add_argument(
        "--budgets", help="latency budgets in ms, comma-separated (default: derived from the variants' batch-1 p95)"
    )
    p.add_argument("--priorities", default="quality,balanced,speed", help="comma-separated (default: %(default)s)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument(
        "--no-two-stage",
        action="store_true",
        help="skip the two-stage report (two_stage.md: fixed plans, confidence cascades, random escalation, "
        "the learned router, the oracle), which runs when the repository ships a router",
    )
    p.add_argument(
        "--no-shift",
        action="store_true",
        help="skip the two-stage report's corrupted validation copies (noise, blur, contrast, jpeg, brightness)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def load_settings_for(args: argparse.Namespace):  # noqa: ANN201 (ServeSettings, imported lazily)
    """The gateway's settings file (--serve-config), so the offline policy is the served one."""
    from adaptive_quant.serving.settings import load_settings

    serve = Path(args.serve_config)
    return load_settings(serve if serve.is_file() else None, environ={})


def _options(args: argparse.Namespace, seed: int) -> EvalOptions:
    routing = load_settings_for(args).routing
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()] if args.budgets else None
    priorities = tuple(Priority.parse(p) for p in args.priorities.split(",") if p.strip())
    return EvalOptions(
        limit=args.limit,
        latency_iters=args.latency_iters,
        throughput_seconds=args.throughput_seconds,
        threads=args.threads,
        budgets=budgets,
        priorities=priorities,
        routing=routing,
        seed=seed,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name_runs_after(args.config, args.overrides)
    if args.url and args.checkpoint:
        print("error: --url measures a running service; --checkpoint builds one in-process. Pick one.", file=sys.stderr)
        return 2
    out = Path(args.out or f"reports/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    try:
        cfg = load_config(args.config, args.overrides)
        opts = _options(args, cfg.seed)
        dataset = load_dataset(cfg.data, cfg.seed)  # only .test is scored; export (--checkpoint) needs val/train
        test = dataset.test
        if args.url:
            from adaptive_quant.evaluation.over_http import evaluate_url

            report = evaluate_url(args.url, test, opts)
        elif args.checkpoint:
            from adaptive_quant.export.pipeline import build_repository

            with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
                # force: evaluate even a variant the gate would refuse (the report shows its drop)
                build_repository(
                    args.checkpoint,
                    cfg.export.model_copy(update={"repository": str(Path(tmp) / "repo"), "register": False}),
                    data=dataset,
                    force=True,
                    tracking=False,
                )
                report = evaluate_repository(Path(tmp) / "repo", test, opts)
                report.meta["checkpoint"] = str(args.checkpoint)
        else:
            report = evaluate_repository(args.repository, test, opts)
        files = write_report(report, out)
        two_stage = None
        if not args.url and not args.checkpoint and not args.no_two_stage and load_manifest(args.repository).router:
            from adaptive_quant.evaluation.offline import pick_samples
            from adaptive_quant.evaluation.render import write_two_stage
            from adaptive_quant.evaluation.two_stage_report import evaluate_two_stage

            planner = load_settings_for(args).planner
            two_stage = evaluate_two_stage(
                args.repository,
                pick_samples(test, opts.limit, opts.seed),
                val=None if args.no_shift else pick_samples(dataset.val, opts.limit, opts.seed),
                # the batch-1 p50 just measured on this host, per variant (a view costs what its variant does)
                pass_ms={v.key: v.latency_ms["p50"] for v in report.variants},
                threads=opts.threads,
                seed=opts.seed,
                planner=planner,
            )
            files += write_two_stage(two_stage, out)
        run_id = None if args.no_mlflow else log_report_to_mlflow(cfg.tracking, report, files)
    except (ConfigError, DataError, ManifestError, EvaluationError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{report.verdict}\n")
    for v in report.variants:
        print(
            f"  {v.key:9} acc {v.metrics.accuracy:7.2%}  F1 {v.metrics.macro_f1:.4f}  "
            f"p50 {v.latency_ms['p50']:7.3f} ms  p99 {v.latency_ms['p99']:7.3f} ms  {v.throughput_b64:8,.0f}/s (b64)"
        )
    front = [p for p in report.points if p.on_latency_frontier]
    print(f"\n  Pareto frontier (accuracy vs mean latency): {len(front)} of {len(report.points)} points")
    if two_stage is not None:
        print(f"\n{two_stage.verdict}\n  two-stage report: {out / 'two_stage.md'}")
    print(f"\nreport: {out / 'report.md'}" + (f"   MLflow run: {run_id}" if run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
