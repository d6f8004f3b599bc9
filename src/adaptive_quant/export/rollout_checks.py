"""The checks a staged repository must pass before `aq-rollout` lets it take any traffic.

A staged repository is what `aq-export` wrote into a fresh folder. Each failed check is one readable
line; any line refuses the roll-out (exit 2) before anything is added to the serving repository.
- its manifest loads; every served variant's file (and the router's weights) exists and matches its sha256;
- the export gates, re-checked from the figures its manifest recorded: finite outputs, and each served
  variant's validation accuracy within export.max_accuracy_drop points of its FP32
  (export.max_pruned_accuracy_drop for an opt-in extra variant, as `aq-export --add-variant` gates it;
  a second network's variants against that network's own FP32, as `aq-export --add-network` gates them);
- every served variant loads in ONNX Runtime and answers seeded probe images with (N, classes) finite
  logits: a network that fails to load or warm up, or outputs NaN, never takes traffic;
- its classes, image size and input/output names are the serving version's (callers and the gateway's
  decoding rely on them);
- its shift figures (manifest "shift".int8) are not more than export.max_shift_drop points below the
  serving version's on any corruption (export/shift.compare).

Pure comparisons apart from the ONNX Runtime runs (`probe_variants`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adaptive_quant.config import ExportConfig
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import Manifest, ManifestError, load_manifest, sha256_file
from adaptive_quant.export.ort_eval import make_session
from adaptive_quant.export.shift import ENTRY_KEY, compare

log = logging.getLogger(__name__)

PROBE_IMAGES = 8  # random images per probe batch: enough to see NaN, few enough to take milliseconds
PROBE_SEED = 0
REFERENCE_KEY = "fp32"
# points: recorded shares are decimal fractions, so 0.92 − 0.91 is 1.0000000000000009 points, not 1
FIGURE_TOLERANCE = 1e-9  # the export gate measures every variant against the FP32 network


@dataclass
class CheckReport:
    manifest: Manifest | None  # the staged manifest (None when it does not load)
    failures: list[str] = field(default_factory=list)  # one line per failed check
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def passed(self) -> bool:
        return self.manifest is not None and not self.failures


def check_files(repo: Path, manifest: Manifest) -> list[str]:
    """Every served variant's file, and both routers' weights (main and speed), exist and match their sha256."""
    out = []
    for v in manifest.served_variants():
        f = repo / v.path
        if not f.is_file():
            out.append(f"variant {v.key}: {f} is missing")
        elif (actual := sha256_file(f)) != v.sha256:
            out.append(f"variant {v.key}: {f} has sha256 {actual[:12]}…, the manifest says {v.sha256[:12]}…")
    for what, router in (("router", manifest.router or {}), ("speed router", manifest.speed_router or {})):
        if not router.get("path"):
            continue
        f = repo / router["path"]
        if not f.is_file():
            out.append(f"{what}: {f} is missing")
        elif router.get("sha256") and sha256_file(f) != router["sha256"]:
            out.append(f"{what}: {f} does not match its sha256 in the manifest")
        if router.get("spec_path") and not (repo / router["spec_path"]).is_file():
            out.append(f"{what}: {repo / router['spec_path']} is missing")
    return out


def check_gates(manifest: Manifest, cfg: ExportConfig) -> list[str]:
    """The export gate on the figures the manifest recorded (validation accuracy against FP32).

    A second network's variant (`network` set, `aq-export --add-network`) is measured against its own
    network's FP32, with export.max_accuracy_drop, as it was gated when it was added.
    """
    out = []
    reference = manifest.variants.get(REFERENCE_KEY)
    if reference is None or reference.val_accuracy is None:
        return [f"no {REFERENCE_KEY} variant with a recorded validation accuracy: the export gate cannot be re-checked"]
    for v in manifest.served_variants():
        if v.val_accuracy is None:
            out.append(f"variant {v.key}: no recorded validation accuracy; the export gate cannot be re-checked")
            continue
        if v.max_abs_logit_diff is not None and not math.isfinite(v.max_abs_logit_diff):
            out.append(f"variant {v.key}: its recorded logit difference from FP32 is {v.max_abs_logit_diff}")
        limit, key = (
            (cfg.max_pruned_accuracy_drop, "max_pruned_accuracy_drop")
            if v.opt_in and not v.network
            else (cfg.max_accuracy_drop, "max_accuracy_drop")
        )
        ref = reference
        if v.network:
            ref = next(
                (x for x in manifest.variants.values() if x.network == v.network and x.precision == REFERENCE_KEY),
                None,
            )
            if ref is None or ref.val_accuracy is None:
                out.append(
                    f"variant {v.key}: network {v.network} has no {REFERENCE_KEY} variant with a recorded "
                    "validation accuracy; the export gate cannot be re-checked"
                )
                continue
        drop = 100.0 * (ref.val_accuracy - v.val_accuracy)  # points
        if drop > limit + FIGURE_TOLERANCE:
            out.append(
                f"variant {v.key}: validation accuracy {v.val_accuracy:.2%} is {drop:.2f} points below "
                f"{ref.key}'s {ref.val_accuracy:.2%} (export.{key} {limit:g} points)"
            )
    return out


def probe_images(manifest: Manifest, n: int = PROBE_IMAGES, seed: int = PROBE_SEED) -> np.ndarray:
    """(n, 3, S, S) float32: seeded random pixels, normalised as the gateway normalises requests."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, manifest.image_size, manifest.image_size, 3), dtype=np.uint8)
    return to_model_input(pixels, manifest.mean, manifest.std)


def probe_variants(repo: Path, manifest: Manifest, threads: int = 1) -> list[str]:
    """Each served variant in ONNX Runtime: loads, answers a batch and a single image, finite (N, classes)."""
    out = []
    x = probe_images(manifest)
    classes = len(manifest.classes)
    for v in manifest.served_variants():
        path = repo / v.path
        if not path.is_file():
            continue  # check_files said so
        try:
            session = make_session(str(path), threads)
        except Exception as exc:  # ORT raises its own types (InvalidProtobuf, Fail, ...)
            out.append(f"variant {v.key}: {path} does not load in ONNX Runtime: {_first_line(exc)}")
            continue
        for batch in (x, x[:1]):  # a batch and batch 1: the gateway's warm-up runs both
            try:
                (logits,) = session.run([manifest.output_name], {manifest.input_name: batch})
            except Exception as exc:
                out.append(f"variant {v.key}: fails warm-up on {len(batch)} probe image(s): {_first_line(exc)}")
                break
            if logits.shape != (len(batch), classes):
                out.append(f"variant {v.key}: answers shape {logits.shape}, expected ({len(batch)}, {classes})")
                break
            if bad := int((~np.isfinite(logits)).sum()):
                out.append(f"variant {v.key}: {bad} of {logits.size} logits are NaN/Inf on seeded probe images")
                break
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_contract(staged: Manifest, serving: Manifest) -> list[str]:
    """What callers and the gateway's decoding rely on is the serving version's."""
    out = []
    for name in ("classes", "image_size", "input_name", "output_name"):
        new, old = getattr(staged, name), getattr(serving, name)
        if new != old:
            out.append(f"{name} differs from the serving version's: {new!r} instead of {old!r}")
    return out


def check_shift(staged: Manifest, serving: Manifest, max_drop_points: float) -> tuple[list[str], list[str]]:
    """(failures, notes): the staged INT8's figures under each corruption against the serving one's."""
    new, old = staged.shift.get(ENTRY_KEY) or {}, serving.shift.get(ENTRY_KEY) or {}
    if not new or not old:
        which = "staged" if not new else "serving"
        return [], [f"shift check skipped: the {which} manifest records no {ENTRY_KEY} figures under corruptions"]
    common = sorted(set(new) & set(old))
    if not common:
        return [], [f"shift check skipped: no corruption in common ({sorted(new)} vs {sorted(old)})"]
    return compare({k: new[k] for k in common}, old, max_drop_points), []


def check_staged(
    staged: Path, serving_manifest: Manifest, cfg: ExportConfig | None = None, threads: int = 1
) -> CheckReport:
    """Every check of the staged repository at `staged` against the serving version's manifest."""
    cfg = cfg or ExportConfig()
    try:
        manifest = load_manifest(staged)
    except ManifestError as exc:
        return CheckReport(manifest=None, failures=[f"the staged manifest does not load: {exc}"])
    report = CheckReport(manifest=manifest)
    if not manifest.served_variants():
        report.failures.append("the staged manifest serves no variant")
    report.failures += check_files(staged, manifest)
    report.failures += check_gates(manifest, cfg)
    report.failures += check_contract(manifest, serving_manifest)
    report.failures += probe_variants(staged, manifest, threads)
    failures, notes = check_shift(manifest, serving_manifest, cfg.max_shift_drop)
    report.failures += failures
    report.notes += notes
    served, staged_keys = (
        {v.key for v in serving_manifest.served_variants()},
        {v.key for v in manifest.served_variants()},
    )
    if missing := sorted(served - staged_keys):
        report.notes.append(f"the staged repository does not serve {missing}: no mirrored agreement on those")
    return report
