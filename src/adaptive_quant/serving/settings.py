"""Typed gateway settings: configs/serve.yaml, then environment variables, then CLI flags.

Precedence (last wins): defaults < YAML file < `AQ_<SECTION>__<KEY>` environment variables
(e.g. `AQ_SERVER__PORT=9000`, `AQ_BACKEND__KIND=triton`, `AQ_REPOSITORY=...`) < `--set
section.key=value` / explicit flags. The loader and its rules (unknown keys and wrong types
refused with a message that names the key and what it accepts; environment and `--set` values
read as YAML scalars, text settings kept as typed: an API key `0x1F` stays "0x1F") are
adaptive_quant.core.settings', on pydantic-settings' stock sources.

An environment variable that merely shares the prefix (`AQ_API_KEY`, the client scripts' key,
or anything else whose first part names no setting) is not a gateway setting: it is ignored,
with one warning naming it, instead of stopping the service. `AQ_SERVER__PROT`, whose section
is a gateway section, is a typo of a setting and is refused like any unknown key.

`ServeSettings` is a pydantic-settings `BaseSettings`, frozen like its sections: built directly
(`ServeSettings(repository=...)`) it reads the AQ_* variables of os.environ under its arguments;
`load_settings` adds the file and lets the caller pass the environment (tests pass `environ={}`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from adaptive_quant.core.latency import LatencyConfig
from adaptive_quant.core.memory_policy import MemoryPolicyConfig
from adaptive_quant.core.planner import PlannerConfig
from adaptive_quant.core.routing import RoutingConfig
from adaptive_quant.core.settings import (
    ConfigError,
    FieldError,
    Section,
    SettingsRoot,
    split_assignment,
    stray_variables,
)
from adaptive_quant.serving.profiling import ProfilingSettings

log = logging.getLogger(__name__)

ENV_PREFIX = "AQ_"
ENV_DELIMITER = "__"

SettingsError = ConfigError  # the name the gateway's callers catch; one error type for every settings tree


AUTO_WORKERS_MAX = 8  # server.workers: auto on a large host; more is a deliberate number


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ServerSettings(Section):
    config_key: ClassVar[str] = "server"

    host: str = "127.0.0.1"  # loopback by default: exposing the service is a deliberate choice
    port: int = Field(8000, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # X-API-Key (or Authorization: Bearer) every /v1/ call must carry; "" = no key. Prefer
    # api_key_file (a mounted secret) or AQ_SERVER__API_KEY to writing the key into a YAML file.
    api_key: str = ""
    api_key_file: str = ""  # read the key from this file (surrounding whitespace stripped)
    drain_timeout_s: float = Field(30.0, gt=0)  # s in-flight requests may take to finish after SIGTERM/SIGINT
    # one log line per request: off by default (at hundreds of requests/s a flood that costs CPU);
    # /metrics and /v1/status carry the counts, warnings and errors are always logged
    access_log: bool = False
    # s an idle keep-alive connection stays open. Longer than the clients' and load balancers'
    # idle timeouts (often 60 s): uvicorn's 5 s closed connections just as clients reused them
    keep_alive_s: float = Field(75.0, gt=0)
    # port of the Open Inference Protocol's gRPC front (what tritonclient.grpc calls), on `host`;
    # 0 = off. Off unless asked for: a second listening port is a deliberate exposure, like
    # `host`, and gRPC's customary 8001 is Triton's own, the default backend.triton_url here
    grpc_port: int = Field(0, ge=0, lt=65536)
    # one send() per HTTP response instead of two (headers, body): serving/transport.py. False
    # serves on uvicorn's own protocol (A/B runs; a uvicorn without httptools uses its own anyway)
    coalesce_writes: bool = True
    # gateway processes serving one port (serving/workers.py); auto = one per CPU core this
    # process may use, at most AUTO_WORKERS_MAX (each holds its own sessions: ~170 MB RSS). Most
    # batches are small and compute inline on the event loop, so one process serves on about one
    # core: the other cores need a worker each
    workers: int | Literal["auto"] = "auto"

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError(f"must be 1..64 or auto, got {v}")
        return v

    def resolved_workers(self) -> int:
        """`workers`, with auto resolved to the CPU cores this process may run on."""
        return min(usable_cores(), AUTO_WORKERS_MAX) if self.workers == "auto" else int(self.workers)

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerSettings:
        if self.grpc_port == self.port:
            raise FieldError("grpc_port", f"server.grpc_port {self.grpc_port} is also server.port; give gRPC its own")
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_key_file(cls, data: Any) -> Any:
        # read before the fields are checked: a frozen section is whole once built
        file = data.get("api_key_file") if isinstance(data, dict) else None
        if not file or not isinstance(file, str):
            return data  # no file (a wrong type is refused by the field's own check)
        if data.get("api_key"):
            raise FieldError(
                "api_key_file", "server.api_key and server.api_key_file are both set; give the key one way"
            )
        path = Path(file)
        if not path.is_file():
            raise FieldError("api_key_file", f"{path} does not exist")
        key = path.read_text().strip()
        if not key:
            raise FieldError("api_key_file", f"{path} is empty")
        return {**data, "api_key": key}


class BackendSettings(Section):
    config_key: ClassVar[str] = "backend"

    # embedded (ONNX Runtime in this process) | triton (a Triton server) | ray (the variants'
    # Ray Serve deployments: what `aq-serve --engine ray` sets in its ingress replicas)
    kind: Literal["embedded", "triton", "ray"] = "embedded"
    triton_url: str = "127.0.0.1:8001"  # host:port; 8001 is Triton's gRPC port, 8000 its HTTP one
    triton_protocol: Literal["grpc", "http"] = "grpc"
    # explicit: the gateway loads/unloads variants through Triton's repository API (Triton must run
    # with --model-control-mode=explicit); none: Triton decides what is loaded
    model_control: Literal["none", "explicit"] = "none"
    # s between Triton health checks while serving (0 = only at start-up)
    health_interval_s: float = Field(1.0, ge=0)
    triton_metrics_url: str = ""  # Triton's /metrics (e.g. http://127.0.0.1:8002/metrics) for the memory policy
    intra_op_threads: int = Field(1, gt=0)  # embedded: ORT threads per call
    # embedded: concurrent ORT calls per variant; auto = one per CPU core this process may use.
    # With 1, a large batch computes on one core while the others wait; small batches run on the
    # event loop either way (inline_max_batch)
    instances: int | Literal["auto"] = "auto"
    # embedded: batches of at most this many samples compute on the event loop instead of a pool
    # thread (0 = never): two thread wake-ups fewer, which on few cores cost more than a small
    # call (serving/backends/batcher.py); under load batches grow past it and go to the pool, so
    # the loop keeps reading requests while they compute
    inline_max_batch: int = Field(4, ge=0)

    @field_validator("instances")
    @classmethod
    def _instances(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or auto, got {v}")
        return v

    def resolved_instances(self, workers: int = 1) -> int:
        """`instances`, with auto resolved to the CPU cores this process may run on, shared
        among `workers` gateway processes (so that all of them together run one call per core)."""
        if self.instances == "auto":
            return max(1, usable_cores() // max(1, workers))
        return int(self.instances)

    # embedded: ORT's pool threads spin between calls (with intra_op_threads > 1): lower latency,
    # at the price of cores the event loop and the other variants need
    allow_spinning: bool = False
    verify_sha256: bool = True  # embedded: refuse a model file that differs from the manifest
    memory_arena: bool = False  # embedded: ORT's CPU arena + memory plans (RSS grows per batch shape)


class BatchingSettings(Section):
    config_key: ClassVar[str] = "batching"

    max_batch_size: int = Field(32, gt=0)  # samples per backend call
    max_queue_delay_us: int = Field(0, ge=0)  # µs to wait for more requests when the variant is idle


class LimitsSettings(Section):
    config_key: ClassVar[str] = "limits"

    max_request_bytes: int = Field(2_097_152, gt=0)  # 2 MiB: ~64 instances as pixel lists, ~400 as PNG
    # bytes of an Open Inference Protocol infer body (after decompression): FP32 tensors are
    # 12 KiB per image in the binary extension, ~40-70 KB as JSON text, so 64 images as JSON
    # need ~4.5 MB
    max_tensor_request_bytes: int = Field(8_388_608, gt=0)
    max_instances: int = Field(64, gt=0)  # images per request


class DeadlineSettings(Section):
    config_key: ClassVar[str] = "deadline"

    grace_ms: float = Field(5.0, ge=0)  # ms added to the remaining budget before a backend call is abandoned
    # a call is never abandoned before slow_factor × its own estimate (+ grace): once the budget
    # is spent, re-sending the samples elsewhere only pays twice, unless the variant is really
    # stuck (far slower than expected), not merely queued a little longer than estimated
    slow_factor: float = Field(4.0, gt=0)
    no_budget_timeout_ms: float = Field(10_000.0, gt=0)  # ms a backend call may take when the caller set no budget
    # the part of the budget kept back from follow-up passes: max(ms, share × budget). They are
    # planned and cut this much before the deadline, so that cancelling a cut call, combining the
    # passes and writing the answer still land within the budget (on busy cores the event loop
    # wakes late, by about a ms)
    followup_reserve_ms: float = Field(1.0, ge=0)
    followup_reserve_share: float = Field(0.02, ge=0, lt=1)


class BreakerSettings(Section):
    config_key: ClassVar[str] = "breaker"

    failures: int = Field(3, gt=0)  # consecutive failed calls that take a variant out of routing...
    cooldown_s: float = Field(5.0, ge=0)  # ...for this many seconds, after which it is tried again


class RolloutSettings(Section):
    config_key: ClassVar[str] = "rollout"

    # follow the repository's versions.json while serving (serving/follower.py): load a version
    # that becomes serving or canary in the background, switch between requests, unload the old
    # one once idle. false: the index is read once, at start-up
    follow: bool = True
    # s between stat()s of versions.json; a roll-out reaches every worker within this (+ the load)
    poll_s: float = Field(1.0, gt=0, le=60)
    # mirrored calls (the canary run on a sample of the serving version's requests) in flight per
    # worker at most; a mirror beyond it is skipped, never queued: mirrors never delay an answer
    mirror_max_in_flight: int = Field(2, ge=0)


class RayScaling(Section):
    """Replicas of one Ray Serve deployment (the ingress, or one variant), and what each holds.

    Ray's autoscaler sizes the deployment between min and max on its ongoing requests per
    replica (target_ongoing_requests); min == max is a fixed count. Its signal, not the
    planner's: the planner sheds follow-ups under load, so a scaler driven by the planner's
    price would see FP32's demand fall exactly when FP32 needs replicas."""

    min_replicas: int = Field(1, ge=0, le=256)
    max_replicas: int = Field(1, ge=1, le=256)
    target_ongoing_requests: float = Field(4.0, gt=0)  # requests in flight per replica the autoscaler aims at
    num_cpus: float = Field(0.25, ge=0, le=64)  # CPUs Ray reserves per replica (fractions pack replicas on a node)
    # requests one replica takes at once (Ray's default, 5, starves a batcher); more wait in the caller's queue
    max_ongoing_requests: int = Field(64, ge=1)
    # at most this many replicas of the deployment on one node (1: spread over nodes, so that a node
    # lost takes one replica with it); 0 = no limit
    max_replicas_per_node: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> RayScaling:
        if self.min_replicas > self.max_replicas:
            raise FieldError("min_replicas", f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    def autoscaled(self) -> bool:
        return self.min_replicas != self.max_replicas


class RaySettings(Section):
    """`aq-serve --engine ray` (serving/ray/): the gateway as a Ray Serve application, an ingress
    deployment over one deployment per variant."""

    config_key: ClassVar[str] = "ray"

    # the cluster to join ("ray://host:10001" or "host:6379"); "" = RAY_ADDRESS, else a local
    # cluster started (and stopped) by aq-serve on this machine
    address: str = ""
    app_name: str = "adaptive-quant"
    # CPUs a local cluster advertises; 0 = this machine's cores. Replicas reserve fractions of them
    local_num_cpus: int = Field(0, ge=0)
    object_store_mb: int = Field(128, ge=64)  # a local cluster's object store; requests are small (~12 KB/image)
    # HTTP proxies: one on the head node, or one per node (behind a load balancer on a cluster)
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    ingress: RayScaling = Field(default_factory=lambda: RayScaling(num_cpus=0.5, max_ongoing_requests=256))
    # per variant key (int8, fp32, ...); a key not listed gets default_variant
    variants: dict[str, RayScaling] = Field(default_factory=dict)
    default_variant: RayScaling = Field(default_factory=RayScaling)
    # % of a deployment's replicas started beyond its target during a rolling update (a new
    # version): old replicas serve until the new ones are ready. 0 = Ray's default (stop, then start)
    max_surge_percent: int = Field(100, ge=0, le=100)
    upscale_delay_s: float = Field(2.0, ge=0)  # s the load must stay high before replicas are added
    downscale_delay_s: float = Field(20.0, ge=0)  # s it must stay low before replicas are removed
    # s between the ingress's reads of each variant's running replicas (the planner's latency model
    # divides a variant's queue among them)
    status_interval_s: float = Field(2.0, gt=0)
    # Ray calls in flight from one ingress replica to each replica of a variant; requests arriving
    # meanwhile are coalesced into the next call (a Ray call costs more CPU here than an INT8 image)
    calls_per_replica: int = Field(2, ge=1, le=64)
    # Ray Serve's throughput-optimised mode (RAY_SERVE_THROUGHPUT_OPTIMIZED: the ingress replicas
    # serve HTTP themselves, user code and router on the replica's own loop) behind HAProxy
    # (RAY_SERVE_ENABLE_HA_PROXY) instead of the Python proxy: 200 against 64 req/s here at
    # concurrency 64. Set on a local cluster; a cluster aq-serve joins has its own environment
    throughput_optimized: bool = True
    start_timeout_s: float = Field(240.0, gt=0)  # s aq-serve waits for the application to be RUNNING

    def scaling(self, key: str) -> RayScaling:
        return self.variants.get(key, self.default_variant)


def _comma_list(value: Any) -> Any:
    """'int8,fp32' (an env var or --set) → ['int8', 'fp32']; a list stays a list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class ServeSettings(SettingsRoot):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, frozen=True)

    repository: str = Field("model_repository", strict=True)
    # manifest keys to route among (e.g. [int8] to pin one precision; [int8_pruned50, fp32] to take an
    # opt-in pruned INT8 variant in as the entry pass); empty = every served variant but the opt-in ones
    variants: Annotated[list[str], BeforeValidator(_comma_list)] = Field(default_factory=list, strict=True)
    server: ServerSettings = Field(default_factory=ServerSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)  # two-stage: follow-ups after the entry pass
    # after batching (validators see the fields above them), and checked when left at its default
    latency: LatencyConfig = Field(default_factory=LatencyConfig, validate_default=True)
    profiling: ProfilingSettings = Field(default_factory=ProfilingSettings)  # re-profile on this host at start-up
    deadline: DeadlineSettings = Field(default_factory=DeadlineSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    memory: MemoryPolicyConfig = Field(default_factory=MemoryPolicyConfig)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)  # follow versions.json while serving
    ray: RaySettings = Field(default_factory=RaySettings)  # aq-serve --engine ray

    @field_validator("latency")
    @classmethod
    def _latency_follows_batching(cls, latency: LatencyConfig, info: ValidationInfo) -> LatencyConfig:
        # the latency model must know how the backend batches (no batching here: it failed, and says so)
        batching = info.data.get("batching")
        if batching is not None and latency.max_batch_size != batching.max_batch_size:
            return latency.model_copy(update={"max_batch_size": batching.max_batch_size})
        return latency


def ignored_variables(environ: Mapping[str, str]) -> list[str]:
    """AQ_* names in `environ` that are not gateway settings: their first part names no setting
    (AQ_API_KEY, the client scripts' key; AQ_FOO). AQ_SERVER__PROT is not among them: its section
    is a gateway section, so it is a misspelt setting, refused when the settings are built."""
    return stray_variables(ServeSettings, environ)


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeSettings:
    """YAML file (optional) < environment (None: os.environ) < overrides ('section.key' → value; text
    read as YAML scalars except for text settings). AQ_* variables that are not gateway settings
    are left out, with one warning naming them (names only: a value may be a client's secret)."""
    ignored = ignored_variables(os.environ if environ is None else environ)
    if ignored:
        many = len(ignored) > 1
        log.warning(
            "ignoring environment variable%s %s: %s; gateway settings look like AQ_SERVER__PORT",
            "s" if many else "",
            ", ".join(ignored),
            "not gateway settings" if many else "not a gateway setting",
        )
    return ServeSettings.load(path, overrides, environ)


def parse_set(items: list[str]) -> dict[str, str]:
    """['server.port=9000', ...] → {'server.port': '9000'} (values parsed later, by each setting's type)."""
    return dict(split_assignment(item, "server.port=9000") for item in items)
