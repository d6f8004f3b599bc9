"""manifest.json: the one description of a model repository that the gateway reads.

Pure data + (de)serialisation; no torch, so serving can import it. Written by the export
stage (its router too: export/plans.py), read by the gateway, the evaluation and the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# keys older repositories carry that nothing reads any more: dropped on load, with a log line
RETIRED_KEYS = {
    "predictor": "the pre-inference pixel predictor was retired (AUROC 0.57 at flagging errors, no better "
    "than random assignment); its entry and accuracy_predictor/ folder are ignored and may be deleted",
}

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """manifest.json is missing, malformed, or disagrees with the files beside it."""


def batch_key_at_or_above(points: dict[str, Any], batch: int) -> str:
    """The key (str(batch size)) of the smallest profiled batch ≥ `batch`, else of the largest."""
    sizes = sorted(int(b) for b in points)
    return str(next((s for s in sizes if s >= batch), sizes[-1]))


@dataclass
class LatencyPoint:
    p50_ms: float  # ms per call at this batch size (median)
    p95_ms: float
    throughput: float  # samples/s at this batch size (batch / mean call time)


@dataclass
class LatencyProfile:
    host: dict[str, Any]  # where it was measured: cpu model, cores, ORT version, threads
    batches: dict[str, LatencyPoint]  # str(batch size) → point (JSON keys are strings)

    def at(self, batch: int) -> LatencyPoint:
        """The point for `batch`, or the smallest profiled batch ≥ it (conservative), or the largest."""
        return self.batches[batch_key_at_or_above(self.batches, batch)]


@dataclass
class VariantEntry:
    key: str  # "fp32", "fp16", "int8", or "int8_ptq" (a baseline, not served)
    precision: str  # a Precision value
    triton_name: str
    path: str  # ONNX file, relative to the repository root
    sha256: str
    size_bytes: int
    served: bool = True  # baselines are exported for reports, not routed to
    # an extra variant of a precision the repository already has (e.g. "int8_pruned50", a pruned
    # network added by `aq-export --add-variant`): loaded and listed like any served variant, but
    # routed to only when the gateway's `variants` setting names it, so adding one never moves
    # traffic by surprise (the cheapest variant of the lowest precision takes every entry pass)
    opt_in: bool = False
    # the network it belongs to, by its Triton name prefix ("cifar_twin"); "" = the repository's own
    # (Manifest.model_name). A second network's variants (`aq-export --add-network`) are loaded
    # like any served variant but run only as follow-up passes, never as the entry pass: the
    # router reads the entry network's outputs, and a plan such as "twin_int8" is a second opinion
    # asked only where the first network is unsure (Manifest.networks describes each network)
    network: str = ""
    followup_only: bool = False
    val_accuracy: float | None = None  # share, on the validation split
    agreement_with_fp32: float | None = None  # share of validation samples with FP32's top-1
    max_abs_logit_diff: float | None = None  # vs FP32, on the validation split
    latency: LatencyProfile | None = None


@dataclass
class PlanEntry:
    """A follow-up plan (core.plans) as measured by the exporter on the validation split."""

    name: str  # "int8:hflip", "int8:hflip+fp32:hflip"; never "none" (that is the entry answer)
    passes: list[str]  # the extra passes, "variant[:view]", in the order they run
    entry: str  # the entry pass it was measured after, e.g. "int8"
    val_accuracy: float  # share right on the validation split when every sample gets this plan
    # extra compute per batch size, ms (the sum of its passes' profiled p50 at that batch size);
    # str(batch) → ms, like LatencyProfile.batches
    extra_ms: dict[str, float] = field(default_factory=dict)

    def extra_ms_at(self, batch: int) -> float:
        """ms for `batch`, or the smallest profiled batch ≥ it (conservative), or the largest."""
        return self.extra_ms[batch_key_at_or_above(self.extra_ms, batch)]


@dataclass
class Manifest:
    model_name: str
    classes: list[str]
    input_name: str
    output_name: str
    image_size: int  # pixels per side; inputs are (N, 3, image_size, image_size) FP32
    mean: list[float]  # per channel, images scaled to 0..1 first
    std: list[float]
    variants: dict[str, VariantEntry]
    training: dict[str, Any] = field(default_factory=dict)  # MLflow run id, git commit, config
    plans: list[PlanEntry] = field(default_factory=list)  # follow-ups the router may choose (two-stage)
    # the two-stage router's predictor: reads the entry pass's output (paths, sha256, plan columns, metrics)
    router: dict[str, Any] | None = None
    # the export gate's shift check (export/shift.py): validation accuracy (0..1) under each
    # corruption, {"int8": {...}, "replaced_int8": {...}}; empty in repositories exported before it
    shift: dict[str, dict[str, float]] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION
    # the model version this manifest describes (core/versions.py: <triton_name>/<version>/model.onnx);
    # a manifest written before versions has none and reads as 1, the only version it had
    version: int = 1
    # the second networks whose variants this repository serves as follow-ups, by Triton name prefix:
    # {"cifar_twin": {"key": "twin", "mlflow_run_id", "git_commit", "checkpoint", "config", "metrics",
    # "val_accuracy": {variant key: share}, "gate", "added_at"}}; the repository's own network is
    # `training`. Empty in a repository of one network.
    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the cheap entry's router (`aq-fit-router --speed-entry KEY`): the same shape as `router`, its
    # "entry" a cheaper variant than the main router's (a pruned INT8). Fitted on that variant's own
    # outputs, so a request that enters on it (X-Priority: speed, or a budget the normal entry no
    # longer fits) plans its follow-ups with it; its plans are in `plans` with entry=<that key>.
    # None in a repository without one (and in every manifest written before it)
    speed_router: dict[str, Any] | None = None

    def plan_accuracies(self, plan_names: list[str], entry: str | None = None) -> list[float] | None:
        """Each plan's accuracy on the validation split when every sample gets it after `entry`
        (None: the main router's entry), in `plan_names`' order ("none": the entry pass alone), as
        the exporter measured them; None when one is missing (a repository written before the
        plans carried it). Names as the router spells them (core.plans.Plan.name): 'int8:hflip',
        'fp32', 'int8:hflip+fp32:hflip'. A plan name may appear once per entry (main and speed)."""
        router = self.router or {}
        if entry is not None and self.speed_router and entry == self.speed_router.get("entry"):
            router = self.speed_router
        entry = entry if entry is not None else router.get("entry")
        # a manifest whose router names no entry (hand-made, or older) has one set of plans: all of them
        plans = [e for e in self.plans if entry is None or e.entry == entry]
        measured: dict[str, float | None] = {e.name: e.val_accuracy for e in plans}
        measured["none"] = router.get("val_entry_accuracy")
        values = [measured.get(name) for name in plan_names]
        if any(v is None for v in values):
            return None
        return [float(v) for v in values if v is not None]

    def served_variants(self) -> list[VariantEntry]:
        return [v for v in self.variants.values() if v.served]

    def routed_variants(self, pinned: list[str] | None = None) -> list[VariantEntry]:
        """The served variants a gateway routes to: those named in `pinned` (its `variants`
        setting) when given, else every served variant that is not opt-in, and the speed
        router's entry even when it is opt-in (fitting a speed router after it is the opt-in)."""
        if pinned:
            return [v for v in self.served_variants() if v.key in pinned]
        cheap = self.speed_entry()
        return [v for v in self.served_variants() if not v.opt_in or v.key == cheap]

    def speed_entry(self) -> str | None:
        """The cheap entry variant's key (the speed router's entry), or None without a speed router."""
        return (self.speed_router or {}).get("entry")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _variant_from_dict(key: str, d: dict[str, Any]) -> VariantEntry:
    d = dict(d)
    lat = d.pop("latency", None)
    profile = None
    if lat is not None:
        profile = LatencyProfile(host=lat["host"], batches={b: LatencyPoint(**p) for b, p in lat["batches"].items()})
    d["key"] = d.get("key", key)
    return VariantEntry(**d, latency=profile)


def manifest_from_dict(data: dict[str, Any]) -> Manifest:
    try:
        d = dict(data)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {d.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
            )
        for key, why in RETIRED_KEYS.items():
            if d.pop(key, None) is not None:
                log.warning("manifest.json has a %r entry: %s", key, why)
        d["variants"] = {k: _variant_from_dict(k, v) for k, v in d["variants"].items()}
        d["plans"] = [PlanEntry(**p) for p in d.get("plans", [])]
        return Manifest(**d)
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"manifest is malformed: {exc}") from exc


def load_manifest(repo: str | Path, verify_files: bool = False) -> Manifest:
    """Read <repo>/manifest.json; with verify_files, also check every variant file's sha256."""
    path = Path(repo) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: is {repo} a model repository made by scripts/export.py?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    manifest = manifest_from_dict(data)
    if verify_files:
        for v in manifest.variants.values():
            f = Path(repo) / v.path
            if not f.is_file():
                raise ManifestError(f"variant {v.key}: file {f} is missing")
            if sha256_file(f) != v.sha256:
                raise ManifestError(
                    f"variant {v.key}: {f} does not match its sha256 in the manifest (damaged or replaced)"
                )
    return manifest


def save_manifest(repo: str | Path, manifest: Manifest) -> Path:
    path = Path(repo) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(path)
    return path
