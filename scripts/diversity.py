"""How differently the networks of two model repositories err, on the validation split (issue 27).

    python scripts/diversity.py model_repository runs/res9_repo                 # INT8 and FP32 of both
    python scripts/diversity.py model_repository runs/res9_repo --out runs/diversity.json
    python scripts/diversity.py runs/repo_twin runs/res9_repo     # a repository serving two networks

Runs each repository's served INT8 and FP32 variants (and INT8 on horizontally flipped images, the
shipped second look) with ONNX Runtime on the validation split that configs/default.yaml draws from
the training set (data.val_size, seed), and prints, per pair: accuracies, disagreement, the share of
the first's errors the second shares, the oracle and the averaged-probability answer. The test split
is never read: this is what a second network is chosen on.

    python scripts/diversity.py model_repository --propose 4      # which plans across networks to list

--propose K grows a follow-up after the INT8 entry one look at a time (every served INT8 variant of
the last repository, each view), keeping at each step the look that most raises the validation
accuracy of the averaged answer (evaluation.diversity.greedy_plans): the candidates for
configs/default.yaml's export.plans, chosen by a rule and on validation only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from adaptive_quant.config import load_config
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.plans import View, apply_view
from adaptive_quant.core.stats import softmax
from adaptive_quant.data import load_validation
from adaptive_quant.evaluation.diversity import greedy_plans, pair_diversity, render_pairs, render_plan_steps
from adaptive_quant.export.ort_eval import make_session, run_batched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repositories", nargs="+", help="model repositories (their serving version)")
    p.add_argument("--config", default="configs/default.yaml", help="data and seed of the validation split")
    p.add_argument("--variants", default="int8,fp32", help="variant keys to compare (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="also write the pairs as JSON here")
    p.add_argument(
        "--propose",
        type=int,
        default=0,
        metavar="K",
        help="instead of pairs: grow a follow-up of up to K looks after the entry, greedily (see above)",
    )
    p.add_argument("--entry", default="int8", help="the entry variant for --propose (default: %(default)s)")
    p.add_argument(
        "--share",
        type=float,
        default=0.2,
        help="--propose also reports the plan given only to the entry's least confident share (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.propose < 0:
        p.error(f"--propose takes K ≥ 1 looks (0: off); got {args.propose}")
    if not 0.0 < args.share <= 1.0:
        p.error(f"--share is a share of the validation images in (0, 1]; got {args.share}")

    cfg = load_config(args.config, [])
    val = load_validation(cfg.data, cfg.seed)  # reads the training folder only
    if args.propose:
        return _propose(Path(args.repositories[-1]), val, args)
    logits: dict[str, np.ndarray] = {}
    keys = args.variants.split(",")
    for repo in map(Path, args.repositories):
        m = load_manifest(repo)
        x = to_model_input(val.images, m.mean, m.std)  # (N, 3, H, W)
        # the repository's own variants by key, and a second network's (aq-export --add-network) by
        # its precision: "int8" also runs twin_int8 when the repository serves cifar_twin beside its own
        chosen = [m.variants[k] for k in keys if k in m.variants]
        chosen += [v for v in m.variants.values() if v.network and v.precision in keys]
        if not chosen:
            print(f"{repo}: none of the variants {keys} (has {', '.join(m.variants)})", file=sys.stderr)
            return 2
        for v in chosen:
            name = f"{v.network or m.model_name}:{v.precision}"
            session = make_session(str(repo / v.path), args.threads)
            logits[name] = run_batched(session, x)
            if v.precision == "int8":
                logits[f"{name}:hflip"] = run_batched(session, np.ascontiguousarray(x[..., ::-1]))
            print(f"ran {name} ({v.key}) on {len(val.labels)} validation images", flush=True)
    pairs = [pair_diversity(a, logits[a], b, logits[b], val.labels) for a, b in itertools.combinations(logits, 2)]
    print(render_pairs(pairs))
    if args.out:
        Path(args.out).write_text(json.dumps([q.to_dict() for q in pairs], indent=2) + "\n")
    return 0


def _propose(repo: Path, val, args: argparse.Namespace) -> int:  # noqa: ANN001 (val: data.Split)
    """Every served INT8 variant of `repo` (pruned ones too), both views, as candidate looks."""
    m = load_manifest(repo)
    if args.entry not in m.variants:
        print(f"{repo}: no entry variant {args.entry!r} (has {', '.join(m.variants)})", file=sys.stderr)
        return 2
    x = to_model_input(val.images, m.mean, m.std)
    keys = [k for k, v in m.variants.items() if v.served and v.precision == "int8"]
    probs: dict[str, np.ndarray] = {}
    for key in keys:
        session = make_session(str(repo / m.variants[key].path), args.threads)
        for view in View:
            name = key if view is View.IDENTITY else f"{key}:{view.value}"
            probs[name] = softmax(run_batched(session, apply_view(x, view)))
        print(f"ran {key} ({', '.join(v.value for v in View)}) on {len(val.labels)} validation images", flush=True)
    entry = probs.pop(args.entry)
    steps = greedy_plans(entry, probs, val.labels, args.propose, args.share)
    entry_accuracy = float((entry.argmax(1) == val.labels).mean())
    print(render_plan_steps(args.entry, entry_accuracy, steps, args.share))
    if args.out:
        Path(args.out).write_text(json.dumps([s.__dict__ for s in steps], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
