"""Load-test a running gateway over HTTP with real labelled images; report latency, budgets,
effective accuracy, throughput, errors, the variant mix over time and the gateway's memory.

  # closed loop: 64 workers, budgets 20-80 ms, adaptive routing vs the same load pinned to fp32
  python scripts/loadtest.py --mode closed --concurrency 64 --budget uniform:20,80 --phases adaptive,fp32

  # open loop, Poisson arrivals at 200 req/s for 60 s; budget = 1.25 × the int8 p95 measured first
  python scripts/loadtest.py --mode poisson --rate 200 --duration 60 --calibrate --budget calibrated:1.25

  # bursts: 100 req/s, ×5 during the last 1 s of every 5 s; synthetic images (no CIFAR-10 needed)
  python scripts/loadtest.py --mode bursty --rate 100 --burst-factor 5 --burst-s 1 --period-s 5 --synthetic

Load shapes. closed: each of --concurrency workers sends its next request when the last one
returned. poisson: exponential inter-arrival times at --rate req/s. bursty: --rate req/s, and
--rate × --burst-factor during the last --burst-s seconds of every --period-s window. Open-loop
latency counts from the scheduled send time; arrivals beyond --max-in-flight are not sent and
count as errors of kind client_overload.

Phases (--phases, comma separated) replay the same arrivals, images and budgets: adaptive sends
the budget only; fp32/fp16/int8 add X-Min-Precision (a floor: int8 allows everything);
quality/balanced/speed add X-Priority. --calibrate first runs a phase with X-Priority: speed and
no budget; the p95 latency of its requests answered by int8 is the budget for --budget calibrated
(or calibrated:M for M × that p95). Under load "speed" spreads work over every variant, so
for a pure INT8 figure start a second gateway pinned to INT8 and point --calibrate-url at it:
  python scripts/serve.py --port 8012 --set 'variants=[int8]' &
  python scripts/loadtest.py --concurrency 64 --duration 60 --calibrate --calibrate-url \
      http://127.0.0.1:8012 --budget calibrated --phases adaptive,fp32

Budgets (--budget, ms of client-measured end-to-end latency, drawn per request from --seed):
none, fixed:50, uniform:20,80, choice:10,50,200, lognormal:MEDIAN,SIGMA, calibrated[:M].
Effective accuracy = images answered correctly AND within their budget / images offered.

Side by side (--compare NAME=URL, repeatable): the same phases, images and schedule run against
each further target in turn (e.g. the plain baseline server, scripts/baseline_server.py), and the
table gives each target's rows and its throughput ratio to the first (--name, "gateway"):
  python scripts/baseline_server.py --port 8013 &
  python scripts/loadtest.py --concurrency 64 --compare baseline=http://127.0.0.1:8013

The Open Inference Protocol (KServe v2): a URL written v2+http://HOST:PORT is driven with POST
/v2/models/{model}/infer, the images as a binary FP32 tensor (what tritonclient sends), the
budget in the X-Latency-Budget-Ms header the v2 front reads too. Its overhead against /v1/classify,
same gateway, same images, one run:
  python scripts/loadtest.py --concurrency 64 --name v1 --compare v2=v2+http://127.0.0.1:8000

Goodput (--goodput): instead of the phases, search for each target's highest Poisson rate with
at least --goodput-share of requests answered within --goodput-budget ms (tools/loadtest/goodput.py:
grow the rate ×2 from --goodput-start while probes pass, then bisect to 5 %), the targets'
probes interleaved; writes the table and the JSON (--out):
  python scripts/loadtest.py --goodput --compare baseline=http://127.0.0.1:8013

Bounded: --duration (<= 3600 s) and --max-requests per phase, plus --warmup s unrecorded before
each phase. Loopback only: any --url whose host is not this machine is refused.
Writes --out (JSON) and --plot (PNG); exit 0 on success, 2 on bad arguments or data, 1 when
the service cannot be used. The gateway and this tool share the CPU: quote figures with the
machine they were measured on (results.json records it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

# run from a checkout without install
from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.data import CIFAR10_CLASSES, DataError, make_synthetic, read_cifar_split
from adaptive_quant.tools.loadtest.config import LoadTestConfig, LoadTestConfigError, check_loopback, split_protocol
from adaptive_quant.tools.loadtest.goodput import GoodputSpec, format_goodput, runner_probe, search_goodput
from adaptive_quant.tools.loadtest.report import build_results, format_table
from adaptive_quant.tools.loadtest.runner import CalibrationError, GatewayError, Workload, run_loadtest
from adaptive_quant.tools.loadtest.schedule import MODES, image_groups, parse_budget, parse_phases

log = logging.getLogger("loadtest")
API_KEY_ENV = "AQ_API_KEY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    g = p.add_argument_group("target")
    g.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the gateway, on loopback; v2+http://... drives its Open Inference Protocol front" + d,
    )
    g.add_argument("--api-key", help=f"sent as X-API-Key (default: ${API_KEY_ENV} if set)")
    g.add_argument("--name", default="gateway", help="what the tables call --url" + d)
    g.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also run everything against this target (loopback), e.g. baseline=http://127.0.0.1:8013; repeatable",
    )
    g = p.add_argument_group("goodput search (--goodput)")
    g.add_argument("--goodput", action="store_true", help="search each target's goodput instead of running phases")
    g.add_argument("--goodput-budget", type=float, default=50.0, help="ms a good request is answered within" + d)
    g.add_argument("--goodput-share", type=float, default=0.99, help="share of requests that must be good" + d)
    g.add_argument("--goodput-start", type=float, default=100.0, help="first probe's rate, req/s" + d)
    g.add_argument("--goodput-max", type=float, default=5000.0, help="highest rate probed, req/s" + d)
    g.add_argument("--goodput-resolution", type=float, default=0.05, help="stop at fail/pass <= 1 + this" + d)
    g.add_argument("--probe-duration", type=float, default=10.0, help="s of recorded load per probe" + d)
    g.add_argument("--probe-warmup", type=float, default=2.0, help="s of unrecorded load before each probe" + d)
    g.add_argument(
        "--goodput-no-header",
        action="store_true",
        help="do not send the budget as X-Latency-Budget-Ms (by default the gateway is told it)",
    )
    g.add_argument(
        "--goodput-no-extend",
        action="store_true",
        help="judge a near-miss probe as it is (by default it is extended by one more probe and judged on both)",
    )
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=MODES, default="closed", help="closed loop or open-loop arrivals" + d)
    g.add_argument("--concurrency", type=int, default=16, help="closed: workers" + d)
    g.add_argument("--rate", type=float, default=100.0, help="open loop: req/s; bursty: outside bursts" + d)
    g.add_argument("--burst-factor", type=float, default=5.0, help="bursty: rate multiplier in a burst" + d)
    g.add_argument("--burst-s", type=float, default=1.0, help="bursty: burst length, s" + d)
    g.add_argument("--period-s", type=float, default=5.0, help="bursty: s between burst starts" + d)
    g.add_argument(
        "--max-in-flight",
        type=int,
        default=256,
        help="open loop: requests in flight at most; more arrivals count as client_overload" + d,
    )
    g.add_argument("--duration", type=float, default=30.0, help="s of recorded load per phase, <= 3600" + d)
    g.add_argument("--max-requests", type=int, help="recorded requests per phase, at most")
    g.add_argument("--warmup", type=float, default=2.0, help="s of unrecorded load before each phase" + d)
    g.add_argument("--timeout", type=float, default=30.0, help="s per request before it counts as a timeout" + d)
    g = p.add_argument_group("requests")
    g.add_argument("--budget", default="none", help="latency budget distribution, ms; forms above" + d)
    g.add_argument("--phases", default="adaptive", help="comma-separated phases" + d)
    g.add_argument("--calibrate", action="store_true", help="run a speed/no-budget phase first (--budget calibrated)")
    g.add_argument(
        "--calibrate-url",
        help="run the calibration phase against this gateway instead, e.g. one "
        "started with --set variants=[int8]: its p95 is then a pure INT8 service's at this load",
    )
    g.add_argument("--images", type=int, default=1000, help="distinct test images to cycle through" + d)
    g.add_argument("--batch", type=int, default=1, help="images per request" + d)
    g.add_argument("--data", default="data/cifar10", help="CIFAR-10 folder; its test split is used" + d)
    g.add_argument("--cache-dir", default="data/cache", help="decoded-split cache" + d)
    g.add_argument("--synthetic", action="store_true", help="synthetic labelled images instead of --data")
    g.add_argument("--seed", type=int, default=0, help="seeds images, arrivals and budgets" + d)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="loadtest_results.json", help="results JSON" + d)
    g.add_argument("--plot", help="results PNG (default: --out with .png)")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--bin", type=float, default=1.0, help="s per bin of the variant mix over time" + d)
    g.add_argument("--progress", type=float, default=5.0, help="s between progress lines, 0 = none" + d)
    g.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> LoadTestConfig:
    """Arguments → a validated config; ValueError (LoadTestConfigError included) on anything wrong."""
    if args.images < 1:
        raise LoadTestConfigError(f"--images must be >= 1, got {args.images}")
    return LoadTestConfig(
        url=args.url,
        mode=args.mode,
        concurrency=args.concurrency,
        rate=args.rate,
        burst_factor=args.burst_factor,
        burst_s=args.burst_s,
        period_s=args.period_s,
        max_in_flight=args.max_in_flight,
        duration_s=args.duration,
        max_requests=args.max_requests,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        budget=parse_budget(args.budget),
        phases=parse_phases(args.phases),
        calibrate=args.calibrate,
        calibrate_url=args.calibrate_url,
        batch=args.batch,
        seed=args.seed,
        bin_s=args.bin,
        progress_s=args.progress,
        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
    )


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, 32, 32, 3) uint8, labels (N,), where they came from); DataError when missing."""
    if args.synthetic:
        split = make_synthetic(args.images, args.seed)
        source = f"synthetic (make_synthetic, seed {args.seed})"
        return split.images, split.labels, source
    if not Path(args.data).exists():
        raise DataError(
            f"data folder {args.data} does not exist; point --data at CIFAR-10 "
            "(see data/cifar10/README.md) or pass --synthetic for generated labelled images"
        )
    split = read_cifar_split(args.data, "test", cache_dir=args.cache_dir)
    n = min(args.images, len(split))
    if n < args.images:
        log.warning("--images %d: the test split has only %d; using all", args.images, n)
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(len(split), size=n, replace=False))
    source = f"{args.data} test split, {n} of {len(split)} images"
    return split.images[pick], split.labels[pick], source


def parse_targets(args: argparse.Namespace) -> dict[str, str]:
    """{name: url}: --url as --name first, then each --compare NAME=URL (loopback only)."""
    targets = {args.name: check_loopback(args.url)}
    for spec in args.compare:
        name, sep, url = spec.partition("=")
        name = name.strip()
        if not sep or not name or not url.strip():
            raise LoadTestConfigError(f"--compare {spec!r}: expected NAME=URL, e.g. baseline=http://127.0.0.1:8013")
        if name in targets:
            raise LoadTestConfigError(f"--compare {spec!r}: the name {name!r} is already taken by another target")
        targets[name] = check_loopback(url.strip())
    return targets


def goodput_spec(args: argparse.Namespace) -> GoodputSpec:
    return GoodputSpec(
        budget_ms=args.goodput_budget,
        share=args.goodput_share,
        start_rps=args.goodput_start,
        max_rps=args.goodput_max,
        resolution=args.goodput_resolution,
        probe_s=args.probe_duration,
        warmup_s=args.probe_warmup,
        send_budget=not args.goodput_no_header,
        extend_failures=not args.goodput_no_extend,
    )


def ratio_lines(summaries: dict[str, dict[str, dict]], reference: str) -> list[str]:
    """Per target and phase: throughput and images/s as a ratio to the reference target's same
    phase, and the p50 latency difference, ms."""
    ref = summaries[reference]
    lines = []
    for name, phases in summaries.items():
        if name == reference:
            continue
        for phase, s in phases.items():
            r = ref.get(phase)
            if not r or not r["throughput_rps"] or s["throughput_rps"] is None:
                continue
            p50, rp50 = s["latency_ms"]["p50"], r["latency_ms"]["p50"]
            d50 = "-" if p50 is None or rp50 is None else f"{p50 - rp50:+.2f} ms"
            lines.append(
                f"{name}/{phase} vs {reference}/{phase}: throughput {s['throughput_rps'] / r['throughput_rps']:.2f}x, "
                f"images/s {s['samples_per_s'] / r['samples_per_s']:.2f}x, p50 {d50}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = make_config(args)
        targets = parse_targets(args)
        spec = goodput_spec(args) if args.goodput else None
        images, labels, source = load_images(args)
        groups = image_groups(len(images), cfg.batch, cfg.seed)
    except (ValueError, DataError) as exc:  # LoadTestConfigError, bad specs, no data
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v2 = any(split_protocol(url)[0] == "v2" for url in targets.values())
    workload = Workload.from_images(images, labels, groups, v2=v2)
    log.info("%d request bodies of %d image(s) from %s", len(workload.bodies), cfg.batch, source)
    extra = {"images_source": source, "images": len(images), "targets": targets}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = list(targets)[1] if len(targets) > 1 else None  # ratios are to the first --compare target
    try:
        if spec is not None:
            found = search_goodput(cfg, targets, spec, runner_probe(workload))
            results = build_results(cfg, {}, None, {**extra, "goodput": asdict(spec)})
            results["goodput"] = found
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(format_goodput(found, spec, reference))
            print(f"wrote {out}")
            return 0
        runs = {args.name: run_loadtest(cfg, workload)}  # cfg.url is --url; calibration, if asked, runs here
        budget = runs[args.name].calibration and runs[args.name].calibration["resolved_budget"]
        for name, url in list(targets.items())[1:]:  # the same budget, schedule and images
            # one replace: the calibrated budget spec is valid only with calibrate, so the resolved
            # budget must arrive in the same step as calibrate=False
            resolved = parse_budget(budget) if budget else cfg.budget
            other = replace(cfg, url=url, calibrate=False, calibrate_url=None, budget=resolved)
            runs[name] = run_loadtest(other, workload)
    except (GatewayError, CalibrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    run = runs[args.name]
    classes = run.service.get("classes")
    if classes and list(classes) != list(CIFAR10_CLASSES):
        log.warning(
            "the service's classes %s are not CIFAR-10's: accuracy figures compare against CIFAR-10 labels", classes
        )
    by_target = {name: {p: res.summary(cfg.bin_s) for p, res in r.phases.items()} for name, r in runs.items()}
    summaries = by_target[args.name]
    results = build_results(cfg, summaries, run.calibration, {**extra, "service": run.service})
    if len(runs) > 1:
        results["compare"] = {
            name: {"url": targets[name], "service": runs[name].service, "phases": by_target[name]}
            for name in list(runs)[1:]
        }
    out.write_text(json.dumps(results, indent=2) + "\n")
    if len(runs) > 1:
        flat = {f"{name}/{p}": s for name, phases in by_target.items() for p, s in phases.items()}
        print(format_table(flat))
        print("\n".join(ratio_lines(by_target, reference or args.name)))
    else:
        print(format_table(summaries))
    if run.calibration:
        c = run.calibration
        print(
            f"calibration: int8 p95 {c['int8_p95_ms']:.2f} ms over {c['int8_requests']} "
            f"requests → budget {c['resolved_budget']}"
        )
    print(f"wrote {out}")
    if not args.no_plot:
        from adaptive_quant.tools.loadtest.plot import plot_run

        shown = {}  # name → (records, summary), in run order
        if run.calibration_result is not None:
            calibration = run.calibration_result.records, run.calibration["summary"]
            shown["calibrate"] = calibration
        for target, r in runs.items():
            for name, res in r.phases.items():
                label = name if len(runs) == 1 else f"{target}/{name}"
                shown[label] = res.records, by_target[target][name]
        title = f"{cfg.mode} load on {cfg.url}, budget {cfg.budget}"
        png_path = args.plot or out.with_suffix(".png")
        png = plot_run(shown, png_path, title=title, bin_s=cfg.bin_s)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
