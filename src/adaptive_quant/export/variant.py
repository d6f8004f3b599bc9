"""Add a second INT8 network (e.g. a structurally pruned checkpoint) to an existing repository.

The new variant `<model>_<key>` (key e.g. "int8_pruned50") is the converted QAT network of
another checkpoint of the same model family, trained on the same data. It passes the same gate
as the repository's own variants, measured against *that repository's* FP32 file on the same
validation split (checked: the recomputed FP32 accuracy must equal the manifest's), with its
own limit (export.max_pruned_accuracy_drop), and is profiled at the repository's INT8 batch
sizes. It is marked opt-in in the manifest: a gateway routes to it only when its `variants`
setting names it, so adding one never moves traffic (core.manifest.Manifest.routed_variants).
The plans and the router are left as they are: they were measured after the INT8 entry pass.

Like build_repository, the new version is assembled aside (the serving version's files, hard-linked,
plus the variant) and added to the repository as its next version, serving, only when complete
(export/versions.py): the earlier versions' files are never touched, and a refused or failed export
leaves the repository as it was.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from adaptive_quant.config import ExperimentConfig, ExportConfig, config_from_dict
from adaptive_quant.core.manifest import (
    LatencyProfile,
    Manifest,
    VariantEntry,
    load_manifest,
    save_manifest,
    sha256_file,
)
from adaptive_quant.core.precision import Precision
from adaptive_quant.data import Dataset, load_dataset
from adaptive_quant.export import onnx_export
from adaptive_quant.export.ort_eval import GateResult, gate_variant, make_session, profile_session, run_batched
from adaptive_quant.export.pipeline import PTQ_KEY, ExportGateError, model_dir, triton_spec
from adaptive_quant.export.shift import shift_check
from adaptive_quant.export.triton_config import render_config
from adaptive_quant.export.versions import add_serving_version, stage_serving_version
from adaptive_quant.training.augment import to_normalized_tensor
from adaptive_quant.training.checkpoint import load_checkpoint, restore_converted_model
from adaptive_quant.training.engine import predict_logits

log = logging.getLogger(__name__)

# the keys build_repository writes: an added variant never replaces one of them
BASE_KEYS = frozenset({Precision.FP32.value, Precision.FP16.value, Precision.INT8.value, PTQ_KEY})
_KEY = re.compile(r"^int8_[a-z0-9_]{1,40}$")  # also a Triton model-name suffix: no dots, no dashes


class VariantError(ValueError):
    """The checkpoint cannot become a variant of this repository (other model, data or split)."""


@dataclass
class VariantResult:
    repository: Path
    key: str
    entry: VariantEntry
    gate: GateResult
    fp32_val_accuracy: float  # the repository's FP32, recomputed on the validation split
    parity: dict[str, float]  # ORT against the torch network it came from, validation split
    # str(batch) → this variant's p50 over the repository's INT8 p50, profiled in the same run
    time_vs_int8: dict[str, float]
    int8_latency: LatencyProfile  # the repository's INT8, profiled beside it (for the ratio)


def default_variant_key(cfg: ExperimentConfig) -> str:
    """'int8_pruned50' for a checkpoint pruned with prune.amount 0.5: the name says the share."""
    if not cfg.prune.enabled:
        raise VariantError(
            "the checkpoint is not pruned (prune.enabled false): name the variant, --add-variant int8_<tag>"
        )
    return f"int8_pruned{round(100 * cfg.prune.amount)}"


def check_variant_key(key: str) -> str:
    if key in BASE_KEYS or not _KEY.fullmatch(key):
        raise VariantError(
            f"variant key {key!r}: use int8_<tag> with lower-case letters, digits and '_' "
            f"(e.g. int8_pruned50), not one of {sorted(BASE_KEYS)}"
        )
    return key


def check_compatible(
    cfg: ExperimentConfig,
    payload: dict[str, Any],
    manifest: Manifest,
    repo: Path,
    same_network: bool = True,
    needs: tuple[str, ...] = (Precision.FP32.value, Precision.INT8.value),
) -> None:
    """Same input, classes and seed as the repository, and the variants `needs` to gate and time against.

    same_network: the repository's model family (an added variant); False: another network
    (`aq-export --add-network`), whose model name must then differ from the repository's.
    """
    missing = set(needs) - set(manifest.variants)
    if missing:
        raise VariantError(f"{repo} has no {sorted(missing)} variant to gate and time the new one against")
    problems = []
    if same_network and cfg.model.name != manifest.model_name:
        problems.append(f"model {cfg.model.name!r}, the repository's is {manifest.model_name!r}")
    if not same_network and cfg.model.name == manifest.model_name:
        problems.append(
            f"model {cfg.model.name!r} is the repository's own network: a new version of it is a plain "
            "aq-export --checkpoint CKPT --repository REPO (--add-network takes a network of another model name)"
        )
    if cfg.data.image_size != manifest.image_size:
        problems.append(f"image size {cfg.data.image_size}, the repository's is {manifest.image_size}")
    classes = payload.get("classes")
    if classes and list(classes) != list(manifest.classes):
        problems.append(f"classes {classes}, the repository's are {manifest.classes}")
    seed = manifest.training.get("config", {}).get("seed")
    if seed is not None and seed != cfg.seed:  # the seed draws the validation split
        problems.append(f"seed {cfg.seed}, the repository's run used {seed} (another validation split)")
    if problems:
        raise VariantError(f"the checkpoint does not fit {repo}: " + "; ".join(problems))


def fp32_reference(
    repo: Path, manifest: Manifest, val_x: np.ndarray, labels: np.ndarray, threads: int
) -> tuple[np.ndarray, float]:
    """(logits (N, classes), accuracy) of the repository's FP32 on the validation split; refuses
    another split (the recomputed accuracy must be the manifest's)."""
    logits = run_batched(make_session(str(repo / manifest.variants["fp32"].path), threads), val_x)
    acc = float((logits.argmax(1) == labels).mean())
    recorded = manifest.variants["fp32"].val_accuracy
    if recorded is not None and abs(acc - recorded) > 1e-9:  # 1 sample of 5,000 is 2e-4
        raise VariantError(
            f"{repo}'s FP32 scores {acc:.4%} on this validation split but {recorded:.4%} in its manifest: "
            "the checkpoint's data section (data.source, data.val_size, seed) draws another split"
        )
    return logits, acc


def parity_vs_torch(logits: np.ndarray, torch_logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ORT against the torch network it came from, on the validation split."""
    return {
        "max_abs_diff_vs_torch": float(np.abs(logits - torch_logits).max()),
        "mean_abs_diff_vs_torch": float(np.abs(logits - torch_logits).mean()),
        "top1_agreement_vs_torch": float((logits.argmax(1) == torch_logits.argmax(1)).mean()),
        "torch_accuracy": float((torch_logits.argmax(1) == labels).mean()),
    }


def profile_beside_int8(
    sessions: dict[str, ort.InferenceSession], work: Path, manifest: Manifest, e: ExportConfig, sample: np.ndarray
) -> tuple[dict[str, LatencyProfile], LatencyProfile, dict[str, dict[str, float]]]:
    """Profile each session at the repository INT8's batch sizes, with that INT8 timed again beside them.

    Returns (profile per key, the INT8's profile, per key str(batch) → p50 over the INT8's p50):
    a ratio from one run on one host, whatever host the manifest's figures came from.
    """
    int8 = manifest.variants[Precision.INT8.value]
    batches = sorted(int(b) for b in int8.latency.batches) if int8.latency else e.profile_batch_sizes
    log.info("profiling %s beside %s at batch sizes %s", sorted(sessions), int8.key, batches)
    int8_session = make_session(str(work / int8.path), e.ort_threads)
    int8_profile = profile_session(int8_session, sample, batches, e.profile_seconds, threads=e.ort_threads)
    profiles, ratios = {}, {}
    for key, session in sessions.items():
        profiles[key] = p = profile_session(session, sample, batches, e.profile_seconds, threads=e.ort_threads)
        ratios[key] = {b: p.batches[b].p50_ms / int8_profile.batches[b].p50_ms for b in p.batches}
    return profiles, int8_profile, ratios


def write_flavor(e: ExportConfig, repo: Path) -> None:
    """The python-backend flavour beside the repository, when export.triton_flavor asks for it."""
    if e.triton_flavor == "python":
        from adaptive_quant.export.triton_python import write_python_flavor

        write_python_flavor(repo, repo.with_name(f"{repo.name}_python"))


def add_variant(
    checkpoint: str | Path,
    repository: str | Path,
    key: str | None = None,
    export_cfg: ExportConfig | None = None,
    data: Dataset | None = None,
    force: bool = False,
    tracking: bool = True,
) -> VariantResult:
    """Gate, profile and publish the checkpoint's converted INT8 network as variant `key` of `repository`.

    key: None = default_variant_key (the pruned share). export_cfg overrides the checkpoint's
    export section (limit, threads, Triton settings). Raises ExportGateError (publishing nothing)
    when the variant breaks the limit, unless force; VariantError when it does not fit the repository.
    """
    payload = load_checkpoint(checkpoint)
    cfg = config_from_dict(payload["config"])
    if export_cfg is not None:
        cfg = cfg.model_copy(update={"export": export_cfg})
    e = cfg.export
    repo = Path(repository).resolve()
    manifest = load_manifest(repo, verify_files=True)  # a damaged repository is refused before any work
    key = check_variant_key(key or default_variant_key(cfg))
    check_compatible(cfg, payload, manifest, repo)
    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    val_x = to_normalized_tensor(data.val.images).numpy()  # (N, 3, 32, 32) float32, the serving input
    labels = data.val.labels

    fp32_logits, fp32_acc = fp32_reference(repo, manifest, val_x, labels, e.ort_threads)

    tname = f"{manifest.model_name}_{key}"
    work = Path(tempfile.mkdtemp(prefix=f".{repo.name}.adding-", dir=repo.parent))
    try:
        # the serving version's files, linked (never written to), paths as a fresh export's (version 1)
        manifest = stage_serving_version(repo, work)
        if key in manifest.variants:
            log.info("replacing variant %s of %s", key, repo)
            shutil.rmtree(work / manifest.variants[key].triton_name, ignore_errors=True)
        path = model_dir(work, tname) / "model.onnx"
        converted = restore_converted_model(payload)
        onnx_export.export_int8(converted, path, cfg.data.image_size)
        session = make_session(str(path), e.ort_threads)
        logits = run_batched(session, val_x)
        gate = gate_variant(logits, fp32_logits, labels, e.max_pruned_accuracy_drop)
        log.info(
            "gate %s acc %.4f (FP32 %.4f, drop %.2f points, limit %.2f) agree %.4f non-finite %d → %s",
            key,
            gate.accuracy,
            fp32_acc,
            gate.accuracy_drop,
            e.max_pruned_accuracy_drop,
            gate.agreement_with_fp32,
            gate.non_finite,
            "pass" if gate.passed else gate.reason,
        )
        reasons = [] if gate.passed else [f"{gate.reason} (export.max_pruned_accuracy_drop sets the limit)"]
        shift = None
        if e.shift_corruptions:  # against the repository's own INT8, the entry pass it would stand in for
            shift = shift_check(
                session,
                data.val.images,
                labels,
                e.shift_corruptions,
                manifest.mean,
                manifest.std,
                repo,
                e.max_shift_drop,
                cfg.seed,
                e.ort_threads,
            )
            reasons += shift.failures
        if reasons and not force:
            raise ExportGateError(
                f"refusing to add {key} to {repo}: {'; '.join(reasons)} (--force publishes anyway); nothing was published"
            )
        for why in reasons:
            log.warning("publishing %s despite the gate (forced): %s", key, why)

        torch_logits = predict_logits(converted, data.val.images)
        parity = parity_vs_torch(logits, torch_logits, labels)
        profiles, int8_profile, ratios = profile_beside_int8({key: session}, work, manifest, e, val_x[:64])
        profile, ratio = profiles[key], ratios[key]

        (path.parent.parent / "config.pbtxt").write_text(render_config(triton_spec(cfg, tname)))
        entry = VariantEntry(
            key=key,
            precision=Precision.INT8.value,
            triton_name=tname,
            path=str(path.relative_to(work)),
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            served=True,
            opt_in=True,
            val_accuracy=gate.accuracy,
            agreement_with_fp32=gate.agreement_with_fp32,
            max_abs_logit_diff=gate.max_abs_logit_diff,
            latency=profile,
        )
        manifest.variants[key] = entry
        # the training run behind each added variant (the top-level entries describe the repository's own)
        manifest.training.setdefault("extra_variants", {})[key] = {
            "checkpoint": str(checkpoint),
            "mlflow_run_id": payload.get("mlflow_run_id"),
            "git_commit": payload.get("git_commit"),
            "config": {"model": payload["config"]["model"], "prune": payload["config"].get("prune")},
            "metrics": payload.get("metrics", {}),
            "gate": {
                "limit_points": e.max_pruned_accuracy_drop,
                "drop_points": gate.accuracy_drop,
                "forced": bool(reasons),
            },
            "shift": shift.to_manifest() if shift is not None else {},
            "parity": parity,
            "time_vs_int8": ratio,
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        save_manifest(work, manifest)
        version, published = add_serving_version(work, repo, source=str(checkpoint), detail=f"added variant {key}")
        entry = published.variants[key]  # its path in the repository: <triton_name>/<version>/model.onnx
        log.info("variant %s added to %s as version %d", key, repo, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = VariantResult(repo, key, entry, gate, fp32_acc, parity, ratio, int8_profile)
    write_flavor(e, repo)
    if tracking and cfg.tracking.enabled:
        _log_to_mlflow(cfg, payload, result)
    return result


def _log_to_mlflow(cfg: ExperimentConfig, payload: dict[str, Any], result: VariantResult) -> None:
    """Log the variant's gate, size and speed into its training run; register it like build_repository does."""
    k, v, g = result.key, result.entry, result.gate
    metrics = {
        f"export/{k}_val_acc": g.accuracy,
        f"export/{k}_drop_points": g.accuracy_drop,
        f"export/{k}_agreement": g.agreement_with_fp32,
        f"export/{k}_size_bytes": float(v.size_bytes),
        f"export/{k}_b64_throughput": v.latency.at(64).throughput if v.latency else 0.0,
    }
    metrics |= {f"export/{k}_time_vs_int8_b{b}": r for b, r in result.time_vs_int8.items()}
    tags = {"exported": "true", "export.variant": k, "export.repository": str(result.repository)}
    log_to_training_run(cfg, payload, result.repository, tags, metrics, [v] if g.passed else [])


def log_to_training_run(
    cfg: ExperimentConfig,
    payload: dict[str, Any],
    repository: Path,
    tags: dict[str, str],
    metrics: dict[str, float],
    register: list[VariantEntry],
) -> None:
    """Tags, metrics and the manifest into the checkpoint's training run (a new export run when it cannot
    be reopened); each of `register` registered in the MLflow registry when export.register."""
    import mlflow
    import onnx

    from adaptive_quant.tracking import start_run

    run_id = payload.get("mlflow_run_id")
    try:
        ctx = start_run(cfg.tracking, kind="export", run_id=run_id)
        tracker = ctx.__enter__()
    except Exception as exc:  # the training run may live in another store
        log.warning("cannot reopen training run %s (%s); logging a new export run", run_id, exc)
        ctx = start_run(cfg.tracking, kind="export")
        tracker = ctx.__enter__()
    try:
        tracker.set_tags(tags)
        tracker.log_metrics(metrics)
        tracker.log_artifact(repository / "manifest.json", artifact_path="model_repository")
        if not cfg.export.register:
            return
        for v in register:
            info = mlflow.onnx.log_model(
                onnx.load(str(repository / v.path)), name=v.triton_name, registered_model_name=v.triton_name
            )
            log.info("registered %s version %s", v.triton_name, info.registered_model_version)
    finally:
        ctx.__exit__(None, None, None)
