"""Write a small classify request (data/sample.json) from CIFAR-10 test images, one per class.

python scripts/make_sample.py                      # from data/cifar10 (class folders or batches)
python scripts/make_sample.py --synthetic --n 8    # no data set needed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from adaptive_quant.core.v1_wire import request_body
from adaptive_quant.data import DataError, make_synthetic, read_cifar_split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/cifar10", help="CIFAR-10 root (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true", help="use generated images instead of the data set")
    p.add_argument("--n", type=int, default=10, help="images (default: %(default)s, one per class first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="data/sample.json")
    args = p.parse_args(argv)

    try:
        split = make_synthetic(args.n, args.seed) if args.synthetic else read_cifar_split(args.data, "test")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    # one image per class first (in class order), then random others
    first = [int(rng.choice(np.flatnonzero(split.labels == c))) for c in np.unique(split.labels)]
    rest = [int(i) for i in rng.permutation(len(split)) if i not in set(first)]
    idx = (first + rest)[: args.n]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(request_body(split.images[idx])) + "\n")
    print(f"wrote {len(idx)} images to {out} (true labels: {split.labels[idx].tolist()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
