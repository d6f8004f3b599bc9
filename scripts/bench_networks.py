"""Issue 27's accuracy targets, over HTTP, in one run: the gateway at each priority against the plain
INT8 server, on the whole test split and on a corrupted copy of it.

    python scripts/baseline_server.py --port 8013 &          # plain FastAPI + ORT INT8, workers = cores
    aq-serve --port 8011 &                                    # the gateway over model_repository
    python scripts/bench_networks.py --gateway http://127.0.0.1:8011 --baseline http://127.0.0.1:8013 \
        --out runs/bench_networks

Every test image goes in its own request, one after the other, to each target: the plain server,
then the gateway with X-Priority balanced and quality, taking turns on --rounds chunks of the split
(so the machine's drift over minutes reaches all of them alike); then the same on a corrupted copy
(each image one corruption of core/corruptions.py, drawn by --seed). The fixed choices (every served
variant of every network alone) are scored by ONNX Runtime on the same files and images. Writes
<out>/side_by_side.json and side_by_side.md: accuracy, points over the best fixed served model with a
95 % paired bootstrap interval over the images, and mean round trip over the plain server's. The 32-image throughput target is aq-loadtest's
(--batch 32 --concurrency 8 --phases speed --compare baseline=URL).

The test split is scored here and nowhere chooses anything: networks, plans, the router and its
settings were fitted and chosen on the validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from adaptive_quant.config import load_config
from adaptive_quant.core.host import cpu_model
from adaptive_quant.data import load_dataset
from adaptive_quant.evaluation.side_by_side import (
    corrupted_copy,
    encode_bodies,
    fixed_outcomes,
    render,
    run_interleaved,
    summarise,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True, help="the gateway's URL")
    p.add_argument("--baseline", required=True, help="the plain server's URL (scripts/baseline_server.py)")
    p.add_argument("--repository", default="model_repository", help="what the gateway serves (fixed choices)")
    p.add_argument("--config", default="configs/default.yaml", help="data section of the test split")
    p.add_argument("--priorities", default="balanced,quality", help="gateway priorities (default: %(default)s)")
    p.add_argument("--corrupted-priorities", default="balanced", help="on the corrupted copy (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="first N test images only (0 = all 10,000)")
    p.add_argument("--seed", type=int, default=27, help="draws each image's corruption (default: %(default)s)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="another gateway (e.g. started with --set planner.followup_price=0.01) run at the first of "
        "--priorities in the same turns, on both copies; repeatable",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="the targets take turns on this many chunks of the split, so the machine's drift "
        "reaches every target alike (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="folder for side_by_side.json and .md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    extra = [tuple(e.split("=", 1)) for e in args.extra]
    if any(len(e) != 2 or not all(e) for e in extra):
        p.error(f"--extra takes NAME=URL, e.g. 'price 0.01=http://127.0.0.1:8014'; got {args.extra}")
    cfg = load_config(args.config, [])
    test = load_dataset(cfg.data, cfg.seed).test
    images, labels = test.images, test.labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    broken, _ = corrupted_copy(images, args.seed)
    sets = {"clean": images, "corrupted": broken}
    priorities = {"clean": args.priorities.split(","), "corrupted": args.corrupted_priorities.split(",")}

    runs, fixed = [], {}
    for data, imgs in sets.items():
        fixed[data] = fixed_outcomes(args.repository, imgs, labels)
        bodies = encode_bodies(imgs)
        targets = [("baseline", args.baseline, None)]
        targets += [(f"gateway {pr}", args.gateway, pr) for pr in filter(None, priorities[data])]
        targets += [(f"{name} {priorities['clean'][0]}", url, priorities["clean"][0]) for name, url in extra]
        runs += run_interleaved(targets, data, bodies, labels, rounds=args.rounds)
        for r in runs[-len(targets) :]:
            logging.info("%s (%s): %.2f %% in %.2f ms mean", r.target, r.data, 100 * r.accuracy, r.mean_ms)

    summary = summarise(runs, fixed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = f"{cpu_model()}, {len(images)} images"
    (out / "side_by_side.json").write_text(json.dumps({"host": host, **summary}, indent=2))
    text = render(summary, host)
    (out / "side_by_side.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
