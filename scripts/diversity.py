"""How differently the networks of two model repositories err, on the validation split (issue 27).

    python scripts/diversity.py model_repository runs/res9_repo                 # INT8 and FP32 of both
    python scripts/diversity.py model_repository runs/res9_repo --out runs/diversity.json
    python scripts/diversity.py runs/repo_twin runs/res9_repo     # a repository serving two networks

Runs each repository's served INT8 and FP32 variants (and INT8 on horizontally flipped images, the
shipped second look) with ONNX Runtime on the validation split that configs/default.yaml draws from
the training set (data.val_size, seed), and prints, per pair: accuracies, disagreement, the share of
the first's errors the second shares, the oracle and the averaged-probability answer. The test split
is never read: this is what a second network is chosen on.
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
from adaptive_quant.data import load_dataset
from adaptive_quant.evaluation.diversity import pair_diversity, render_pairs
from adaptive_quant.export.ort_eval import make_session, run_batched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repositories", nargs="+", help="model repositories (their serving version)")
    p.add_argument("--config", default="configs/default.yaml", help="data and seed of the validation split")
    p.add_argument("--variants", default="int8,fp32", help="variant keys to compare (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="also write the pairs as JSON here")
    args = p.parse_args(argv)

    cfg = load_config(args.config, [])
    val = load_dataset(cfg.data, cfg.seed).val
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


if __name__ == "__main__":
    sys.exit(main())
