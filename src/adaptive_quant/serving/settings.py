"""Typed gateway settings: configs/serve.yaml, then environment variables, then CLI flags.

Precedence (last wins): dataclass defaults < YAML file < `AQ_<SECTION>__<KEY>` environment
variables (e.g. `AQ_SERVER__PORT=9000`, `AQ_BACKEND__KIND=triton`, `AQ_REPOSITORY=...`) <
`--set section.key=value` / explicit flags. Unknown keys and wrong types are rejected with
a message that names the key. String values from the environment and `--set` are read as
YAML scalars, so `true`, `12`, `0.5` get their natural types (string settings keep the text as typed).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml

from adaptive_quant.core.latency import LatencyConfig
from adaptive_quant.core.memory_policy import MemoryPolicyConfig
from adaptive_quant.core.routing import RoutingConfig

ENV_PREFIX = "AQ_"


class SettingsError(ValueError):
    """A setting is unknown or has the wrong type; the message names the key."""


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # X-API-Key (or Authorization: Bearer) every /v1/ call must carry; "" = no key. Prefer
    # api_key_file (a mounted secret) or AQ_SERVER__API_KEY to writing the key into a YAML file.
    api_key: str = ""
    api_key_file: str = ""  # read the key from this file (surrounding whitespace stripped)
    drain_timeout_s: float = 30.0  # s in-flight requests may take to finish after SIGTERM/SIGINT
    # one log line per request: off by default (at ~700 req/s a flood that cost ~2 % CPU, measured
    # with py-spy); /metrics and /v1/status carry the counts, warnings and errors are always logged
    access_log: bool = False
    # s an idle keep-alive connection stays open. Longer than the clients' and load balancers'
    # idle timeouts (often 60 s): uvicorn's 5 s closed connections just as clients reused them
    # (seen as resets in bursty load tests with 5 s gaps)
    keep_alive_s: float = 75.0


@dataclass
class BackendSettings:
    kind: Literal["embedded", "triton"] = "embedded"
    triton_url: str = "127.0.0.1:8001"  # host:port; 8001 is Triton's gRPC port, 8000 its HTTP one
    triton_protocol: Literal["grpc", "http"] = "grpc"
    # explicit: the gateway loads/unloads variants through Triton's repository API (Triton must run
    # with --model-control-mode=explicit); none: Triton decides what is loaded
    model_control: Literal["none", "explicit"] = "none"
    health_interval_s: float = 1.0  # s between Triton health checks while serving (0 = only at start-up)
    triton_metrics_url: str = ""  # Triton's /metrics (e.g. http://127.0.0.1:8002/metrics) for the memory policy
    intra_op_threads: int = 1  # embedded: ORT threads per call
    instances: int = 1  # embedded: concurrent ORT calls per variant
    verify_sha256: bool = True  # embedded: refuse a model file that differs from the manifest
    memory_arena: bool = False  # embedded: ORT's CPU arena + memory plans (RSS grows per batch shape)


@dataclass
class BatchingSettings:
    max_batch_size: int = 32  # samples per backend call
    max_queue_delay_us: int = 0  # µs to wait for more requests when the variant is idle


@dataclass
class LimitsSettings:
    max_request_bytes: int = 2_097_152  # 2 MiB: ~64 instances as pixel lists, ~400 as PNG
    max_instances: int = 64  # images per request


@dataclass
class DeadlineSettings:
    grace_ms: float = 5.0  # ms added to the remaining budget before a backend call is abandoned
    # a call is never abandoned before slow_factor × its own estimate (+ grace): once the budget
    # is spent, re-sending the samples elsewhere only pays twice, unless the variant is really
    # stuck (far slower than expected), not merely queued a little longer than estimated
    slow_factor: float = 4.0
    no_budget_timeout_ms: float = 10_000.0  # ms a backend call may take when the caller set no budget


@dataclass
class BreakerSettings:
    failures: int = 3  # consecutive failed calls that take a variant out of routing...
    cooldown_s: float = 5.0  # ...for this many seconds, after which it is tried again


@dataclass
class ServeSettings:
    repository: str = "model_repository"
    # manifest keys to route among (e.g. [int8] to pin one precision); empty = every served variant
    variants: list[str] = field(default_factory=list)
    server: ServerSettings = field(default_factory=ServerSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    deadline: DeadlineSettings = field(default_factory=DeadlineSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    memory: MemoryPolicyConfig = field(default_factory=MemoryPolicyConfig)

    def __post_init__(self) -> None:
        positive = {
            "server.port": self.server.port,
            "backend.intra_op_threads": self.backend.intra_op_threads,
            "backend.instances": self.backend.instances,
            "batching.max_batch_size": self.batching.max_batch_size,
            "limits.max_request_bytes": self.limits.max_request_bytes,
            "limits.max_instances": self.limits.max_instances,
            "deadline.no_budget_timeout_ms": self.deadline.no_budget_timeout_ms,
            "breaker.failures": self.breaker.failures,
            "server.drain_timeout_s": self.server.drain_timeout_s,
            "server.keep_alive_s": self.server.keep_alive_s,
            "deadline.slow_factor": self.deadline.slow_factor,
        }
        for key, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{key} must be > 0, got {value}")
        for key, value in {
            "batching.max_queue_delay_us": self.batching.max_queue_delay_us,
            "deadline.grace_ms": self.deadline.grace_ms,
            "breaker.cooldown_s": self.breaker.cooldown_s,
            "backend.health_interval_s": self.backend.health_interval_s,
        }.items():
            if value < 0:
                raise SettingsError(f"{key} must be >= 0, got {value}")
        if self.server.api_key and self.server.api_key_file:
            raise SettingsError("server.api_key and server.api_key_file are both set; give the key one way")
        if self.server.api_key_file:
            path = Path(self.server.api_key_file)
            if not path.is_file():
                raise SettingsError(f"server.api_key_file: {path} does not exist")
            self.server.api_key = path.read_text().strip()
            if not self.server.api_key:
                raise SettingsError(f"server.api_key_file: {path} is empty")
        # the latency model must know how the backend batches
        if self.latency.max_batch_size != self.batching.max_batch_size:
            self.latency = dataclasses.replace(self.latency, max_batch_size=self.batching.max_batch_size)


# ----------------------------------------------------------------------------- loading


class RawText(str):
    """A value typed on a command line or in the environment: read as YAML (so `true`, `12`, `0.5`
    get their natural types) except where the setting is a string, which keeps the text as typed
    (an API key `0x1F` or `yes` must not become 31 or True)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, RawText):
        value = str(value) if tp is str else _scalar(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise SettingsError(f"{key} must be a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise SettingsError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise SettingsError(f"{key} must be one of {[e.value for e in tp]}, got {value!r}") from None
    if origin is list and typing.get_args(tp) == (str,):
        if isinstance(value, str):  # "int8,fp32" from an env var or --set
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SettingsError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SettingsError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise SettingsError(f"{key}: unsupported setting type {tp}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise SettingsError(f"unknown setting {key!r}; known here: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{prefix or 'settings'}: {exc}") from exc


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SettingsError(f"cannot set {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """AQ_SERVER__PORT=9000 → {'server.port': 9000}; AQ_REPOSITORY=x → {'repository': 'x'}."""
    out = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            out[name[len(ENV_PREFIX) :].lower().replace("__", ".")] = RawText(raw)
    return out


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeSettings:
    """YAML file (optional) < environment < overrides ('section.key' → value, strings parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"settings file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SettingsError(f"{p} must hold a mapping of settings")
        tree = loaded
    for dotted, value in env_overrides(os.environ if environ is None else environ).items():
        _set_path(tree, dotted, value)
    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted, RawText(value) if isinstance(value, str) else value)
    return _build(ServeSettings, tree)


def parse_set(items: list[str]) -> dict[str, str]:
    """['server.port=9000', ...] → {'server.port': '9000'} (values parsed later)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SettingsError(f"--set expects section.key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out
