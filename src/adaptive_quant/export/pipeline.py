"""Checkpoint → validated, profiled Triton model repository (+ manifest.json, + MLflow registry).

The repository is assembled in a temporary folder beside the target and published only when
every served variant has passed the gate, so a refused or crashed export leaves the previous
repository (or nothing) behind, never half of one. Into a fresh folder it is moved whole, as
version 1; into an existing repository it is added as the next version, which serves at once
(export/versions.py: the earlier versions' files are never touched).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from adaptive_quant.config import ExperimentConfig, ExportConfig, config_from_dict
from adaptive_quant.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    VariantEntry,
    load_manifest,
    save_manifest,
    sha256_file,
)
from adaptive_quant.core.precision import Precision, triton_model_name
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, load_dataset
from adaptive_quant.export import onnx_export
from adaptive_quant.export.ort_eval import (
    GateResult,
    gate_variant,
    make_session,
    profile_session,
    run_batched,
)
from adaptive_quant.export.shift import shift_check
from adaptive_quant.export.triton_config import TritonModelSpec, render_config
from adaptive_quant.export.versions import add_serving_version, initialise_versions
from adaptive_quant.training.augment import to_normalized_tensor
from adaptive_quant.training.checkpoint import load_checkpoint, restore_converted_model, restore_float_model
from adaptive_quant.training.engine import predict_logits

log = logging.getLogger(__name__)

PTQ_KEY = "int8_ptq"


class ExportGateError(RuntimeError):
    """A variant failed the validation gate; nothing was published."""


@dataclass
class ExportResult:
    repository: Path
    manifest: Manifest
    gates: dict[str, GateResult]
    parity: dict[str, dict[str, float]] = field(default_factory=dict)  # ORT vs torch, per variant


def model_dir(repo: Path, name: str) -> Path:
    """Where a fresh (staged) export writes a Triton model's files: version 1."""
    return repo / name / "1"


def write_variant_files(
    payload: dict[str, Any], cfg: ExperimentConfig, repo: Path, calibration: np.ndarray
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Export FP32/FP16/INT8 (+ PTQ baseline) ONNX files into `repo`; also return the torch models for parity."""
    _, float_model = restore_float_model(payload)
    converted = restore_converted_model(payload)
    name, size = cfg.model.name, cfg.data.image_size
    paths = {
        Precision.FP32.value: model_dir(repo, triton_model_name(name, Precision.FP32)) / "model.onnx",
        Precision.FP16.value: model_dir(repo, triton_model_name(name, Precision.FP16)) / "model.onnx",
        Precision.INT8.value: model_dir(repo, triton_model_name(name, Precision.INT8)) / "model.onnx",
    }
    steps = [
        ("fp32", lambda: onnx_export.export_fp32(float_model, paths["fp32"], size)),
        ("fp16", lambda: onnx_export.export_fp16(float_model, paths["fp16"], size)),
        ("int8", lambda: onnx_export.export_int8(converted, paths["int8"], size)),
    ]
    if cfg.export.ptq_baseline:
        paths[PTQ_KEY] = model_dir(repo, f"{name}_{PTQ_KEY}") / "model.onnx"
        steps.append((PTQ_KEY, lambda: onnx_export.export_ptq_int8(paths["fp32"], paths[PTQ_KEY], calibration)))
    for key, step in tqdm(steps, desc="export ONNX", unit="variant", dynamic_ncols=True):
        t = time.perf_counter()
        step()
        log.info("wrote %s (%.1f KB) in %.1f s", paths[key], paths[key].stat().st_size / 1e3, time.perf_counter() - t)
    return paths, {"fp32": float_model, "int8": converted}


def triton_spec(cfg: ExperimentConfig, name: str) -> TritonModelSpec:
    e = cfg.export
    return TritonModelSpec(
        name=name,
        input_name=onnx_export.INPUT_NAME,
        output_name=onnx_export.OUTPUT_NAME,
        image_size=cfg.data.image_size,
        num_classes=cfg.model.num_classes,
        max_batch_size=e.max_batch_size,
        preferred_batch_sizes=tuple(e.preferred_batch_sizes),
        max_queue_delay_us=e.max_queue_delay_us,
        instance_count=e.instance_count,
        instance_kind=e.instance_kind,
        flavor="onnxruntime",
    )


def build_repository(
    checkpoint: str | Path,
    export_cfg: ExportConfig | None = None,
    data: Dataset | None = None,
    force: bool = False,
    tracking: bool = True,
) -> ExportResult:
    """The whole export: ONNX variants → gate on the validation split → latency profile → publish.

    export_cfg overrides the checkpoint's own export section (e.g. another repository path).
    Raises ExportGateError (publishing nothing) when a served variant fails the gate, unless force.
    """
    payload = load_checkpoint(checkpoint)
    cfg = config_from_dict(payload["config"])  # the config only: no network needed here
    if export_cfg is not None:
        cfg = cfg.model_copy(update={"export": export_cfg})
    e = cfg.export
    target = Path(e.repository).resolve()
    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    val_x = to_normalized_tensor(data.val.images).numpy()  # (N, 3, 32, 32) float32, the serving input
    rng = np.random.default_rng(cfg.seed)
    calib_idx = rng.choice(len(data.train), size=min(e.ptq_calibration_images, len(data.train)), replace=False)
    calibration = to_normalized_tensor(data.train.images[np.sort(calib_idx)]).numpy()

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        paths, torch_models = write_variant_files(payload, cfg, work, calibration)
        result = _validate_profile_describe(cfg, payload, work, paths, torch_models, data, val_x, force, target)
        if e.router and "int8" in result.manifest.variants:
            from adaptive_quant.export.plans import fit_router

            result.manifest = fit_router(work, data.val, e.plans, entry="int8", threads=e.ort_threads).manifest
        result.manifest = publish_export(work, target, source=str(checkpoint))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.repository = target
    if e.triton_flavor == "python":
        from adaptive_quant.export.triton_python import write_python_flavor

        flavor_dir = write_python_flavor(target, target.with_name(f"{target.name}_python"))
        log.info("python-backend flavour for the local Triton written to %s", flavor_dir)
    if tracking and cfg.tracking.enabled:
        _log_to_mlflow(cfg, payload, target, result)
    return result


def _validate_profile_describe(
    cfg: ExperimentConfig,
    payload: dict[str, Any],
    repo: Path,
    paths: dict[str, Path],
    torch_models: dict[str, Any],
    data: Dataset,
    val_x: np.ndarray,
    force: bool,
    replaced: Path,
) -> ExportResult:
    e = cfg.export
    labels = data.val.labels
    sessions = {k: make_session(str(p), e.ort_threads) for k, p in paths.items()}
    logits = {
        k: run_batched(s, val_x) for k, s in tqdm(sessions.items(), desc="validate", unit="variant", dynamic_ncols=True)
    }
    gates = {k: gate_variant(logits[k], logits["fp32"], labels, e.max_accuracy_drop) for k in logits}

    # ORT against the torch networks it came from: same numbers, same accuracy
    torch_fp32 = predict_logits(torch_models["fp32"], data.val.images)
    torch_int8 = predict_logits(torch_models["int8"], data.val.images)
    parity = {
        "fp32": {
            "max_abs_diff_vs_torch": float(np.abs(logits["fp32"] - torch_fp32).max()),
            "torch_accuracy": float((torch_fp32.argmax(1) == labels).mean()),
        },
        "int8": {
            "max_abs_diff_vs_torch": float(np.abs(logits["int8"] - torch_int8).max()),
            "mean_abs_diff_vs_torch": float(np.abs(logits["int8"] - torch_int8).mean()),
            "top1_agreement_vs_torch": float((logits["int8"].argmax(1) == torch_int8.argmax(1)).mean()),
            "torch_accuracy": float((torch_int8.argmax(1) == labels).mean()),
        },
    }
    for k, g in gates.items():
        log.info(
            "gate %-8s acc %.4f agree %.4f max|Δ| %.3f non-finite %d → %s",
            k,
            g.accuracy,
            g.agreement_with_fp32,
            g.max_abs_logit_diff,
            g.non_finite,
            "pass" if g.passed else g.reason,
        )
    failed = {k: g.reason for k, g in gates.items() if not g.passed and k != PTQ_KEY}  # the baseline is not served
    shift = None
    if e.shift_corruptions and "int8" in sessions:
        shift = shift_check(
            sessions["int8"],
            data.val.images,
            labels,
            e.shift_corruptions,
            list(CIFAR10_MEAN),
            list(CIFAR10_STD),
            replaced,
            e.max_shift_drop,
            cfg.seed,
            e.ort_threads,
        )
        if not shift.passed:
            failed["shift"] = "; ".join(shift.failures)
    if failed and not force:
        lines = "; ".join(f"{k}: {why}" for k, why in failed.items())
        raise ExportGateError(f"refusing to publish: {lines} (--force publishes anyway)")
    for k, why in failed.items():
        log.warning("publishing %s despite the gate (forced): %s", k, why)

    profiles = {}
    for k, s in tqdm(sessions.items(), desc="profile", unit="variant", dynamic_ncols=True):
        profiles[k] = profile_session(s, val_x[:64], e.profile_batch_sizes, e.profile_seconds, threads=e.ort_threads)

    variants: dict[str, VariantEntry] = {}
    for k, path in paths.items():
        tname = path.parent.parent.name
        (path.parent.parent / "config.pbtxt").write_text(render_config(triton_spec(cfg, tname)))
        g = gates[k]
        variants[k] = VariantEntry(
            key=k,
            precision=Precision.INT8.value if k == PTQ_KEY else k,
            triton_name=tname,
            path=str(path.relative_to(repo)),
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
            served=k != PTQ_KEY and (g.passed or force),
            val_accuracy=g.accuracy,
            agreement_with_fp32=g.agreement_with_fp32,
            max_abs_logit_diff=g.max_abs_logit_diff,
            latency=profiles[k],
        )
    manifest = Manifest(
        model_name=cfg.model.name,
        classes=list(payload.get("classes") or data.classes),
        input_name=onnx_export.INPUT_NAME,
        output_name=onnx_export.OUTPUT_NAME,
        image_size=cfg.data.image_size,
        mean=list(CIFAR10_MEAN),
        std=list(CIFAR10_STD),
        variants=variants,
        training={
            "mlflow_run_id": payload.get("mlflow_run_id"),
            "git_commit": payload.get("git_commit"),
            "metrics": payload.get("metrics", {}),
            "parity": parity,
            "config": {"model": payload["config"]["model"], "seed": payload["config"]["seed"]},
        },
        shift=shift.to_manifest() if shift is not None else {},
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    save_manifest(repo, manifest)
    return ExportResult(repository=repo, manifest=manifest, gates=gates, parity=parity)


def publish_export(work: Path, target: Path, source: str) -> Manifest:
    """Publish the finished export in `work`: into an existing repository as its next version, serving
    (`work` is removed after); else moved into place as version 1. Returns the published manifest."""
    if (target / MANIFEST_NAME).is_file():
        version, manifest = add_serving_version(work, target, source=source)
        shutil.rmtree(work, ignore_errors=True)
        log.info("published %s as version %d of %s", source, version, target)
        return manifest
    initialise_versions(work, source=source)
    publish_repository(work, target)
    return load_manifest(target)


def publish_repository(work: Path, target: Path) -> None:
    """Swap the finished repository into place; the old one is removed only after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{int(time.time())}")
        target.rename(old)
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _log_to_mlflow(cfg: ExperimentConfig, payload: dict[str, Any], repo: Path, result: ExportResult) -> None:
    """Log the repository into the training run and register served variants; gate-passers get 'champion'."""
    import mlflow
    import onnx
    from mlflow.tracking import MlflowClient

    from adaptive_quant.tracking import start_run

    run_id = payload.get("mlflow_run_id")
    try:
        ctx = start_run(cfg.tracking, kind="export", run_id=run_id)
        tracker = ctx.__enter__()
    except Exception as exc:  # the training run may live in another store: log a fresh export run instead
        log.warning("cannot reopen training run %s (%s); logging a new export run", run_id, exc)
        ctx = start_run(cfg.tracking, kind="export")
        tracker = ctx.__enter__()
    try:
        tracker.set_tags({"exported": "true"})
        for k, v in result.manifest.variants.items():
            g = result.gates[k]
            tracker.log_metrics(
                {
                    f"export/{k}_val_acc": g.accuracy,
                    f"export/{k}_agreement": g.agreement_with_fp32,
                    f"export/{k}_size_bytes": float(v.size_bytes),
                    f"export/{k}_b64_throughput": v.latency.at(64).throughput if v.latency else 0.0,
                }
            )
        tracker.log_artifact(repo / "manifest.json", artifact_path="model_repository")
        if not cfg.export.register:
            return
        client = MlflowClient()
        for k, v in result.manifest.variants.items():
            if not v.served:
                continue
            info = mlflow.onnx.log_model(
                onnx.load(str(repo / v.path)), name=v.triton_name, registered_model_name=v.triton_name
            )
            version = info.registered_model_version
            if version is not None and result.gates[k].passed:
                client.set_registered_model_alias(v.triton_name, "champion", str(version))
    finally:
        ctx.__exit__(None, None, None)
