"""Reading one series from a gateway's /metrics, as Prometheus would scrape it (shared by the tests)."""

from __future__ import annotations


def metric(client, name, **labels) -> float:
    """One sample's value from /metrics, as Prometheus would scrape it."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        metric_name, _, rest = series.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric_name == name and got == want:
            return float(value)
    return 0.0
