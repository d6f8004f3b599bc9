"""Memory-pressure policy: which variant to unload when memory is tight, which to load back when it eases.

Pure decision logic (no I/O, no clock of its own): the gateway's controller measures memory,
gathers facts about the variants and applies the decision through the backend.

Pressure = any measured figure above its `*_high_pct`; eased = every figure below its
`*_low_pct` (hysteresis: between the two marks nothing changes, so a variant is not loaded and
unloaded in a loop around one threshold). One action per decision, then `cooldown_s` of
waiting, so the memory figures can settle before the next step.

"Least useful" loaded variant, in this order:
1. dominated: another loaded variant is at least as precise, at least as accurate and at
   least as fast, so the router never needs this one (FP16 on a CPU host, typically);
2. the smallest share of recently routed samples (what callers actually use);
3. the lower precision (keeps every X-Min-Precision floor answerable longest);
4. the larger file (frees more memory).
Loading back goes the other way round: the most useful variant the policy unloaded first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from adaptive_quant.core.settings import FieldError, Section


class MemoryPolicyConfig(Section):
    model_config = ConfigDict(frozen=True)
    config_key: ClassVar[str] = "memory"

    enabled: bool = False  # needs a backend with model control (triton + backend.model_control=explicit)
    interval_s: float = Field(2.0, gt=0.0)  # s between two measurements
    # % of host memory in use (psutil) above which variants are unloaded
    system_high_pct: float = Field(90.0, ge=0.0, le=100.0)
    system_low_pct: float = Field(80.0, ge=0.0, le=100.0)  # % below which they are loaded back
    # % of host memory held by the gateway process itself (RSS)
    process_high_pct: float = Field(50.0, ge=0.0, le=100.0)
    process_low_pct: float = Field(40.0, ge=0.0, le=100.0)
    # % of Triton's memory in use, from its /metrics (GPU if it has one, else host)
    server_high_pct: float = Field(90.0, ge=0.0, le=100.0)
    server_low_pct: float = Field(80.0, ge=0.0, le=100.0)
    min_loaded: int = Field(1, ge=1)  # never unload below this many variants
    cooldown_s: float = Field(10.0, ge=0.0)  # s after an action before the next one
    usage_half_life_s: float = Field(60.0, gt=0.0)  # s; routed-sample counts older than this weigh half

    @model_validator(mode="after")
    def _marks_in_order(self) -> MemoryPolicyConfig:
        for name in ("system", "process", "server"):
            high, low = getattr(self, f"{name}_high_pct"), getattr(self, f"{name}_low_pct")
            if not low < high:  # hysteresis needs a gap between the two marks
                raise FieldError(f"{name}_low_pct", f"must be < memory.{name}_high_pct ({high:g}), got {low:g}")
        return self


@dataclass(frozen=True)
class MemorySample:
    system_pct: float  # host memory in use, %
    process_pct: float  # the gateway process's RSS, % of host memory
    server_pct: float | None = None  # Triton's memory in use, %; None when not measured


@dataclass(frozen=True)
class VariantFacts:
    key: str
    rank: int  # Precision.rank: higher = more precise
    accuracy: float | None  # validation accuracy (share), from the manifest
    latency_ms: float | None  # profiled p95 at batch 1, ms
    size_bytes: int
    usage: float  # recently routed samples (decayed count)
    loaded: bool
    unloaded_by_policy: bool  # only these are loaded back by the policy


@dataclass(frozen=True)
class Decision:
    action: Literal["unload", "load", "hold"]
    variant: str | None
    reason: str
    pressure: Literal["high", "normal", "low"]  # above a high mark / between / below every low mark


def pressure_level(sample: MemorySample, cfg: MemoryPolicyConfig) -> tuple[str, str]:
    """('high' | 'normal' | 'low', the figures that decided it, in words)."""
    figures = [("system", sample.system_pct), ("process", sample.process_pct), ("server", sample.server_pct)]
    measured = [(n, v) for n, v in figures if v is not None]
    above = [
        f"{n} memory {v:.1f}% > {getattr(cfg, f'{n}_high_pct'):g}%"
        for n, v in measured
        if v > getattr(cfg, f"{n}_high_pct")
    ]
    if above:
        return "high", "; ".join(above)
    if all(v < getattr(cfg, f"{n}_low_pct") for n, v in measured):
        return "low", ", ".join(f"{n} {v:.1f}% < {getattr(cfg, f'{n}_low_pct'):g}%" for n, v in measured)
    return "normal", ", ".join(f"{n} {v:.1f}%" for n, v in measured)


def dominated_by(v: VariantFacts, others: Sequence[VariantFacts]) -> str | None:
    """Key of a variant in `others` that makes `v` unnecessary (≥ precision, ≥ accuracy, ≤ latency), or None."""
    if v.accuracy is None or v.latency_ms is None:
        return None  # unknown quality or speed: never assume it is redundant
    for u in others:
        if u.key == v.key or u.accuracy is None or u.latency_ms is None:
            continue
        if u.rank >= v.rank and u.accuracy >= v.accuracy and u.latency_ms <= v.latency_ms:
            return u.key
    return None


def usefulness_order(
    candidates: Sequence[VariantFacts], loaded: Sequence[VariantFacts]
) -> list[tuple[VariantFacts, str]]:
    """`candidates` from least to most useful against the `loaded` set, each with why, in words."""
    total = sum(v.usage for v in loaded) + sum(v.usage for v in candidates if not v.loaded) or 1.0
    rows = []
    for v in candidates:
        dom = dominated_by(v, [u for u in loaded if u.key != v.key])
        share = v.usage / total
        why = (
            f"dominated by {dom} (≥ precision, ≥ accuracy, ≤ latency)" if dom else "not dominated"
        ) + f", {share:.0%} of recent samples"
        rows.append(((dom is None, share, v.rank, -v.size_bytes), v, why))
    rows.sort(key=lambda r: r[0])
    return [(v, why) for _, v, why in rows]


def decide(
    sample: MemorySample,
    variants: Sequence[VariantFacts],
    cfg: MemoryPolicyConfig,
    since_last_action_s: float,
) -> Decision:
    """One step of the policy: unload the least useful loaded variant, load back the most useful one, or hold."""
    level, figures = pressure_level(sample, cfg)
    loaded = [v for v in variants if v.loaded]
    if level == "normal":
        return Decision("hold", None, f"memory between the marks ({figures})", level)
    if since_last_action_s < cfg.cooldown_s:
        return Decision(
            "hold",
            None,
            f"cooling down ({since_last_action_s:.1f} of {cfg.cooldown_s:g} s) after the last action",
            level,
        )
    if level == "high":
        if len(loaded) <= cfg.min_loaded:
            return Decision(
                "hold",
                None,
                f"{figures}, but only {len(loaded)} variant(s) loaded (min_loaded {cfg.min_loaded})",
                level,
            )
        victim, why = usefulness_order(loaded, loaded)[0]
        return Decision("unload", victim.key, f"{figures}; least useful loaded variant: {why}", level)
    back = [v for v in variants if not v.loaded and v.unloaded_by_policy]
    if not back:
        return Decision("hold", None, f"memory eased ({figures}); nothing to load back", level)
    best, why = usefulness_order(back, loaded)[-1]
    return Decision("load", best.key, f"memory eased ({figures}); most useful unloaded variant: {why}", level)
