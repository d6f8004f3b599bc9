"""Classify a file of images through the gateway and print a table.

    python scripts/predict.py --input data/sample.json --latency-budget 10
    python scripts/predict.py --input data/sample.json --url http://127.0.0.1:8000 --priority quality

Without --url the gateway runs in-process on the repository (embedded backend), exactly as
scripts/serve.py would serve it. Each sample is its own request (so each has its own latency)
unless --one-request. Exit code: 0 when every sample was answered, 1 otherwise, 2 on bad setup.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.core.v1_wire import headers_for
from adaptive_quant.serving.settings import ServeSettings, SettingsError, load_settings, parse_set
from adaptive_quant.tools.client import (
    auth_headers,
    classify_rows,
    format_table,
    http_client,
    load_request,
)


@contextmanager
def open_client(url: str | None, settings: ServeSettings | None, api_key: str | None = None) -> Iterator[httpx.Client]:
    """An httpx-compatible client: against a running service (`url`), or an in-process gateway
    built from `settings` (embedded backend, started and stopped around the block). Every
    request carries `api_key` (in-process: the settings' own key) as X-API-Key when there is one."""
    if url is not None:
        with http_client(url, api_key=api_key) as client:
            yield client
        return
    with warnings.catch_warnings():  # starlette's note about httpx2 is not the user's business
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient  # runs the app's lifespan in-process

    from adaptive_quant.serving.app import create_app

    with TestClient(create_app(settings), headers=auth_headers(api_key or settings.server.api_key)) as client:
        yield client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input", default="data/sample.json", help='request body {"instances": [...]} (default: %(default)s)'
    )
    p.add_argument("--latency-budget", type=float, help="X-Latency-Budget-Ms per request, ms (default: none)")
    p.add_argument("--priority", choices=["quality", "balanced", "speed"])
    p.add_argument("--min-precision", choices=["int8", "fp16", "fp32"])
    p.add_argument("--url", help="a running service; without it the gateway runs in-process")
    p.add_argument(
        "--api-key",
        default=os.environ.get("AQ_API_KEY"),
        help="X-API-Key for a service that requires one (default: $AQ_API_KEY)",
    )
    p.add_argument("--one-request", action="store_true", help="send all samples in one request")
    p.add_argument("--config", default="configs/serve.yaml")
    p.add_argument("--repository", help="model repository (in-process only)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    try:
        body = load_request(args.input)
        settings = None
        if args.url is None:
            overrides = parse_set(args.set) | ({"repository": args.repository} if args.repository else {})
            settings = load_settings(args.config, overrides)
        headers = headers_for(args.latency_budget, args.priority, args.min_precision)
        with open_client(args.url, settings, api_key=args.api_key) as client:
            rows = classify_rows(client, body, headers, one_by_one=not args.one_request)
    except (OSError, ValueError, SettingsError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    answered = [r for r in rows if r.status == 200]
    met = sum(r.budget_met == "true" for r in answered)
    where = args.url or f"in-process ({settings.repository})"
    print(f"\n{len(answered)}/{len(rows)} answered by {where}; budget met for {met}/{len(answered)}")
    return 0 if len(answered) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
