"""The JSON of GET /v1/status and GET /v1/models (schemas.StatusResponse, schemas.ModelsResponse).

Each reads the service's model once, so one answer describes one model version.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from adaptive_quant.serving.metrics import OUTCOMES
from adaptive_quant.serving.service import ClassifierService


def status_body(service: ClassifierService) -> dict[str, Any]:
    """Variants, health, live latency, load, memory, routing counts, router and profiles."""
    model = service.model
    m = service.metrics
    health = service.backend.variants()
    routable = model.routable(health, time.monotonic())
    batching = getattr(service.backend, "batch_stats", lambda: {})()
    states = getattr(service.backend, "model_states", lambda: {})()  # Triton: loaded or not, and why
    variants = []
    for j, key in enumerate(model.keys):
        entry = model.manifest.variants[key]
        variants.append(
            {
                "key": key,
                "precision": entry.precision,
                "triton_name": entry.triton_name,
                "healthy": health[key].healthy,
                "detail": health[key].detail,
                "routable": bool(routable[j]),
                "val_accuracy": entry.val_accuracy,
                "latency": model.estimator.snapshot(key),
                "routed_samples": int(m.value("aq_samples_routed_total", variant=key)),
                "failures": model.breakers[key].total_failures,
                "batching": batching.get(key),
                "loaded": states[key]["loaded"] if key in states else health[key].healthy,
                "loaded_reason": states[key]["reason"] if key in states else health[key].detail,
            }
        )
    fallbacks = {
        key: int(sum(m.value("aq_fallbacks_total", variant=key, reason=r) for r in ("error", "timeout")))
        for key in model.keys
    }
    followup = model.followup
    plans = [p.name for p in followup.plans[1:]] if followup else []
    proc = psutil.Process()
    mem, cpu = proc.memory_info(), proc.cpu_times()
    worker = service.worker
    return {
        "model": model.manifest.model_name,
        "version": model.version,  # the serving version
        # every version this worker holds or held: state (loading, serving, canary, retired,
        # failed), since when, requests served here, in flight now (requests + mirrors), why
        "versions": service.book.to_json(),
        "canary": _canary(service),
        "backend": service.backend.name,
        "ready": service.ready(),
        # what routes a request when no router does (none in the repository, or planner.enabled false)
        "single_stage": {
            "in_use": followup is None,
            "summary": model.prior.summary(),
            **model.prior.to_json(),
        },
        "router": {
            "two_stage": followup is not None,
            "summary": model.router.summary,
            "plans": plans,
            "followups_by_plan": {p: int(m.value("aq_followups_total", plan=p)) for p in plans},
            "followup_passes_lost": {
                r: int(m.value("aq_followup_passes_lost_total", reason=r)) for r in ("cut", "failed")
            },
            "detail": model.router.detail,
        },
        "speed_router": _speed_router(service),
        "variants": variants,
        "in_flight_requests": service.in_flight,
        "process": {
            "rss_bytes": mem.rss,
            "pid": proc.pid,
            "cpu_s": round(cpu.user + cpu.system, 4),
            # one of server.workers processes on this port: the figures here are this worker's own
            # (/metrics sums all of them)
            "worker": worker.index if worker else 0,
            "workers": worker.count if worker else 1,
        },
        # every process of this gateway together (the supervisor and all its workers): what a
        # load test's memory and CPU figures must read
        "gateway": gateway_usage(proc, worker is not None and worker.count > 1),
        "routing": {
            "samples_by_variant": {v["key"]: v["routed_samples"] for v in variants},
            "fallbacks_by_variant": fallbacks,
            "requests": {o: int(m.value("aq_requests_total", outcome=o)) for o in OUTCOMES},
            "budget_met": int(m.value("aq_budget_total", result="met")),
            "budget_missed": int(m.value("aq_budget_total", result="missed")),
        },
        "uptime_s": round(time.monotonic() - service.started_at, 3),
        "model_control": getattr(service.backend, "model_control", "none"),
        "memory": service.memory_controller.snapshot() if service.memory_controller else {"enabled": False},
        "profile": model.profile.to_json(),
    }


def _speed_router(service: ClassifierService) -> dict[str, Any]:
    """The cheap entry: whether it is in use (or why not), its variant, plans, and how many samples
    entered on it and were escalated (aq_samples_routed, aq_entry_followups in /metrics)."""
    model, m = service.model, service.metrics
    entry = model.manifest.speed_entry()
    loaded = model.speed_router
    if entry is None:
        return {"in_use": False, "summary": "none in the manifest: no cheap entry"}
    stage = model.speed_followup
    plans = [p.name for p in stage.plans[1:]] if stage else [e.name for e in model.manifest.plans if e.entry == entry]
    if model.cheap_entry is not None:
        summary = loaded.summary if loaded else ""
    elif loaded is None or loaded.predictor is None:
        summary = loaded.summary if loaded else "not loaded: no cheap entry"
    elif model.followup is None:
        summary = f"not in use: the main router is not ({model.router.summary}); no cheap entry"
    else:
        summary = f"not in use: {entry} is not among the variants routed (the variants setting); no cheap entry"
    by_plan = {p: int(m.value("aq_entry_followups_total", entry=entry, plan=p)) for p in plans}
    return {
        "in_use": model.cheap_entry is not None,
        "entry": entry,
        "plans": plans,
        "summary": summary,
        # follow-ups of samples that entered on it are planned with at least this priority
        "followup_priority_at_least": service.settings.planner.cheap_entry_priority.value,
        "samples_entered": int(m.value("aq_samples_routed_total", variant=entry)),
        "escalated": sum(by_plan.values()),
        "followups_by_plan": by_plan,
        "detail": loaded.detail if loaded else {},
    }


def _canary(service: ClassifierService) -> dict[str, Any] | None:
    """The canary this worker serves now, its shares and its mirrored comparisons here."""
    versions = service.versions
    if versions.canary is None:
        return None
    m, label = service.metrics, versions.canary.label
    return {
        "version": versions.canary.version,
        "share": versions.share,
        "mirror_share": versions.mirror_share,
        "mirrors_in_flight": service.mirrors.in_flight,
        "mirror_comparisons": {
            r: int(m.value("aq_mirror_comparisons_total", version=label, result=r))
            for r in ("agree", "disagree", "failed")
        },
    }


def models_body(service: ClassifierService) -> dict[str, Any]:
    """The model and its variants, from manifest.json, with each variant's health."""
    man = service.model.manifest
    health = service.backend.variants()
    variants = [
        {
            "key": v.key,
            "precision": v.precision,
            "triton_name": v.triton_name,
            "served": v.served,
            "healthy": health[v.key].healthy if v.key in health else False,
            "size_bytes": v.size_bytes,
            "sha256": v.sha256,
            "val_accuracy": v.val_accuracy,
            "agreement_with_fp32": v.agreement_with_fp32,
            "latency_p95_ms": {b: p.p95_ms for b, p in v.latency.batches.items()} if v.latency else None,
        }
        for v in man.variants.values()
    ]
    return {
        "model": man.model_name,
        "classes": man.classes,
        "input": {
            "name": man.input_name,
            "shape": ["N", 3, man.image_size, man.image_size],
            "dtype": "float32",
            "mean": man.mean,
            "std": man.std,
        },
        "output": {"name": man.output_name, "shape": ["N", len(man.classes)], "dtype": "float32"},
        "variants": variants,
        "training": man.training,
    }


def gateway_usage(proc: psutil.Process, supervised: bool) -> dict[str, Any]:
    """RSS and CPU time summed over the gateway's processes: this one alone, or the supervisor
    and every process it started (workers.py) when this is one of several workers."""
    procs = [proc]
    if supervised:
        try:
            parent = proc.parent()
            procs = [parent, *parent.children()] if parent is not None else procs
        except psutil.Error:  # the supervisor went away mid-call: this worker's own figures
            procs = [proc]
    rss, cpu_s, pids = 0, 0.0, []
    for p in procs:
        try:
            with p.oneshot():
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu_s += t.user + t.system
                pids.append(p.pid)
        except psutil.Error:  # a worker restarting right now
            continue
    return {"processes": len(pids), "pids": pids, "rss_bytes": rss, "cpu_s": round(cpu_s, 4)}
