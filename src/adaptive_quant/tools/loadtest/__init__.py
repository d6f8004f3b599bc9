"""Load generator for a running gateway (scripts/loadtest.py).

schedule  pure: arrival times (closed / Poisson / bursty), budget specs and their draws, phases
config    the typed run configuration, validated on construction (loopback only, bounds)
stats     pure: per-request records → the phase summary (percentiles, budgets, accuracy, mix)
runner    I/O: drives the service over HTTP, phase by phase
wire      a minimal HTTP/1.1 keep-alive client (httpx cost more CPU than the gateway it measured)
plot      one PNG of a run (matplotlib, headless)
"""

from adaptive_quant.tools.loadtest.config import LoadTestConfig, LoadTestConfigError, check_loopback
from adaptive_quant.tools.loadtest.schedule import BudgetSpec, Phase, parse_budget, parse_phases
from adaptive_quant.tools.loadtest.stats import RequestRecord, summarize

__all__ = [
    "BudgetSpec",
    "LoadTestConfig",
    "LoadTestConfigError",
    "Phase",
    "RequestRecord",
    "check_loopback",
    "parse_budget",
    "parse_phases",
    "summarize",
]
