"""Measure the follow-up plans on the validation split and fit the two-stage router's predictor.

Given a model repository whose variants are exported and profiled:
  1. run the entry variant and every pass the plans use (variant × view) on the validation split
     (ONNX Runtime, the files the gateway serves): real outputs, not the torch model's
  2. per sample and plan, is the combined answer (mean of the passes' softmax) right? (N, P)
  3. fit the deferral predictor on those outcomes (predictor.fit_deferral: 75 % fit, 25 % calibration)
  4. write it to <repository>/router/1/, and the plans (validation accuracy, extra ms per batch size
     from the variants' latency profiles) and the router entry into manifest.json

A repository has a main router (after INT8, `manifest.router`) and may have a speed router
(role "speed": after a cheaper entry such as a pruned INT8, in router/1/speed/, `manifest.speed_router`).
Fitting one leaves the other and its plans as they are: each plan records the entry it follows.

Never the test split: the evaluation measures the result on it. Used by the export pipeline and by
`aq-fit-router`, which refits the router of an existing repository.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import Manifest, PlanEntry, load_manifest, save_manifest
from adaptive_quant.core.plans import NONE, Pass, Plan, View, apply_view
from adaptive_quant.core.stats import softmax
from adaptive_quant.data import Split
from adaptive_quant.export.ort_eval import make_session, run_batched
from adaptive_quant.predictor.deferral import SPEC_FILE, WEIGHTS_FILE
from adaptive_quant.predictor.fit_deferral import DeferralFitConfig, DeferralFitReport, fit_deferral, plan_outcomes

log = logging.getLogger(__name__)

ROUTER_DIR = "router/1"  # inside the repository; not a Triton model (the gateway runs it in-process)
SPEED_ROUTER_DIR = f"{ROUTER_DIR}/speed"  # the cheap entry's router, inside the main one's version folder
ROLES = ("main", "speed")


@dataclass
class RouterFit:
    manifest: Manifest
    report: DeferralFitReport
    outcomes: np.ndarray  # (N, P) bool on the validation split, column 0 = none


def pass_logits(
    repo: str | Path, manifest: Manifest, x: np.ndarray, passes: set[Pass], threads: int = 0
) -> dict[Pass, np.ndarray]:
    """Logits (N, C) of every pass on the normalised inputs x (N, 3, H, W), one ORT session per variant."""
    out: dict[Pass, np.ndarray] = {}
    for variant in sorted({p.variant for p in passes}):
        if variant not in manifest.variants:
            raise ValueError(f"plan pass on variant {variant!r}: the repository has {sorted(manifest.variants)}")
        session = make_session(str(Path(repo) / manifest.variants[variant].path), threads)
        for p in sorted((p for p in passes if p.variant == variant), key=lambda q: q.view.value):
            out[p] = run_batched(session, apply_view(x, p.view))
    return out


def plan_extra_ms(manifest: Manifest, plan: Plan) -> dict[str, float]:
    """str(batch) → ms of the plan's extra passes: the sum of their variants' profiled p50 at that batch."""
    batches: dict[str, float] = {}
    for p in plan.passes:
        profile = manifest.variants[p.variant].latency
        if profile is None:
            return {}
        for b, point in profile.batches.items():
            batches[b] = batches.get(b, 0.0) + point.p50_ms
    return batches


def fit_router(
    repo: str | Path,
    val: Split,
    plans: tuple[str, ...] | list[str],
    entry: str = "int8",
    threads: int = 0,
    fit_config: DeferralFitConfig | None = None,
    role: str = "main",
) -> RouterFit:
    """Measure `plans` after `entry` on the validation split, fit the router, update the repository.

    role "main": the router every request uses after the normal entry (manifest.router, router/1/).
    role "speed": the cheap entry's router (manifest.speed_router, router/1/speed/), fitted after a
    cheaper variant than the main router's entry; the main router and its plans stay as they are."""
    repo = Path(repo)
    manifest = load_manifest(repo)
    if role not in ROLES:
        raise ValueError(f"router role {role!r}: one of {', '.join(ROLES)}")
    if entry not in manifest.variants:
        raise ValueError(f"entry variant {entry!r} is not in the repository (has {sorted(manifest.variants)})")
    other = manifest.speed_router if role == "main" else manifest.router
    if other and other.get("entry") == entry:
        raise ValueError(
            f"the {'speed' if role == 'main' else 'main'} router already follows {entry!r}: the cheap entry "
            "must be another variant than the main router's (aq-fit-router --speed-entry KEY)"
        )
    parsed = [Plan.parse(p) for p in plans]
    if any(not p.passes for p in parsed):
        raise ValueError(f"'{NONE}' is always a plan; list only follow-ups, got {list(plans)}")
    # a plan over a variant this repository lacks (a second network not added yet, a pruned INT8 of
    # another repository) is left out with a line, so one plan list (export.plans) serves a
    # repository of one network at export and of two after `aq-export --add-network`
    lacking = [p for p in parsed if not p.variants <= set(manifest.variants)]
    for p in lacking:
        log.info(
            "plan %s left out: the repository has no %s", p.name, ", ".join(sorted(p.variants - set(manifest.variants)))
        )
    parsed = [p for p in parsed if p not in lacking]
    if not parsed:
        raise ValueError(
            f"none of the plans {list(plans)} runs on this repository's variants {sorted(manifest.variants)}"
        )
    entry_pass = Pass(entry, View.IDENTITY)
    needed = {entry_pass} | {p for plan in parsed for p in plan.passes}
    log.info("router: running %s on %d validation images", ", ".join(sorted(p.name for p in needed)), len(val.labels))
    logits = pass_logits(repo, manifest, to_model_input(val.images, manifest.mean, manifest.std), needed, threads)
    probs = {p.name: softmax(z) for p, z in logits.items()}
    outcomes = plan_outcomes(
        probs[entry_pass.name], probs, [[]] + [[p.name for p in plan.passes] for plan in parsed], val.labels
    )
    names = [NONE] + [p.name for p in parsed]
    predictor, report = fit_deferral(logits[entry_pass], outcomes, names, fit_config)
    router_dir = ROUTER_DIR if role == "main" else SPEED_ROUTER_DIR
    extra = {"entry": entry, "role": role, "fitted_on": f"validation split, {len(val.labels)} images"}
    spec = predictor.save(repo / router_dir, extra=extra)
    # the other router's plans stay: each router's plans are those whose entry is its own
    kept_entry = (manifest.speed_router if role == "main" else manifest.router) or {}
    kept = [e for e in manifest.plans if kept_entry and e.entry == kept_entry.get("entry")]
    fitted = [
        PlanEntry(
            name=plan.name,
            passes=[p.name for p in plan.passes],
            entry=entry,
            val_accuracy=float(outcomes[:, j + 1].mean()),
            extra_ms=plan_extra_ms(manifest, plan),
        )
        for j, plan in enumerate(parsed)
    ]
    manifest.plans = fitted + kept if role == "main" else kept + fitted
    gain = {k: v.__dict__ for k, v in report.gain.items()}
    described = {
        "kind": "deferral_mlp",
        "entry": entry,
        "path": f"{router_dir}/{WEIGHTS_FILE}",
        "spec_path": f"{router_dir}/{SPEC_FILE}",
        "sha256": spec["sha256"],
        "plans": names,
        "features": list(predictor.feature_names),
        "parameters": predictor.num_parameters(),
        "val_entry_accuracy": float(outcomes[:, 0].mean()),
        # on the calibration part of the validation split: "follow-up turns a wrong answer right"
        "fix_auroc": {
            k: {"learned": g["auroc_learned_gain"], "confidence": g["auroc_confidence"]} for k, g in gain.items()
        },
        "ece": {k: v.ece_calibrated for k, v in report.plans.items()},
    }
    if role == "main":
        manifest.router = described
    else:
        manifest.speed_router = described
    save_manifest(repo, manifest)
    log.info(
        "%s router: %d plans after %s; validation accuracy if applied to every sample: %s",
        role,
        len(parsed),
        entry,
        ", ".join(f"{e.name} {e.val_accuracy:.2%}" for e in fitted),
    )
    return RouterFit(manifest=manifest, report=report, outcomes=outcomes)
