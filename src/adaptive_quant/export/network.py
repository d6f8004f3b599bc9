"""Add a second network (another model, trained on the same data) to an existing repository.

`aq-export --checkpoint runs/twin/best.pt --repository model_repository --add-network` exports the
checkpoint's FP32 (float network) and INT8 (converted QAT network) as `<model>_fp32` and
`<model>_int8` (variant keys `<key>_fp32`, `<key>_int8`, key "twin" for "cifar_twin"), marked
`followup_only`: the gateway loads and serves them, but only as follow-up passes, never as the
entry pass (the router reads the entry network's outputs; a second network that errs on other
images is asked only where the first is unsure). No FP16: on CPU FP16 runs slower than FP32, and
follow-ups are priced by their time, so it would never be chosen; a GPU host would want one.

Its INT8 passes the repository's gate against *its own* FP32 (export.max_accuracy_drop, finite
outputs), on the repository's validation split (the same seed draws it; checked: the repository's
FP32 recomputed must score what its manifest says). Recorded beside it: its agreement with the
repository's INT8 (share of validation samples with the same top-1; the lower, the more a second
opinion can add), ORT against torch, and its time over the repository's INT8 at that INT8's batch
sizes, profiled in the same run. No shift check: that guards the entry pass, which it never takes.

The plans and the router are left as they are: `aq-fit-router` measures the plans of export.plans
(configs/default.yaml names plans over both networks) and fits the router on them. Like
add_variant, the new version is assembled aside and added as the next serving version only when
complete; a refusal leaves the repository as it was.
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
from adaptive_quant.export.ort_eval import GateResult, gate_variant, make_session, run_batched
from adaptive_quant.export.pipeline import ExportGateError, model_dir, triton_spec
from adaptive_quant.export.triton_config import render_config
from adaptive_quant.export.variant import (
    BASE_KEYS,
    VariantError,
    check_compatible,
    fp32_reference,
    log_to_training_run,
    parity_vs_torch,
    profile_beside_int8,
    write_flavor,
)
from adaptive_quant.export.versions import add_serving_version, stage_serving_version
from adaptive_quant.training.augment import to_normalized_tensor
from adaptive_quant.training.checkpoint import load_checkpoint, restore_converted_model, restore_float_model
from adaptive_quant.training.engine import predict_logits

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[a-z][a-z0-9]{0,19}$")  # the prefix of its variant keys: short, no '_' (keys split on it)
PRECISIONS = (Precision.FP32, Precision.INT8)  # no FP16: see the module docstring


@dataclass
class NetworkResult:
    repository: Path
    model_name: str  # the network's Triton name prefix, e.g. "cifar_twin"
    key: str  # its variant keys' prefix, e.g. "twin"
    version: int  # the repository version that serves it
    entries: dict[str, VariantEntry]  # variant key → entry as published
    gates: dict[str, GateResult]  # variant key → gate against its own FP32
    agreement_with_int8: float  # its INT8's top-1 against the repository's INT8, validation split
    parity: dict[str, float]  # its INT8 in ORT against the torch network it came from
    # variant key → str(batch) → its p50 over the repository's INT8 p50, profiled in the same run
    time_vs_int8: dict[str, dict[str, float]]
    int8_latency: LatencyProfile  # the repository's INT8, profiled beside them


def default_network_key(model_name: str) -> str:
    """'twin' for 'cifar_twin': the model name after its first '_' (all of it when it has none)."""
    return model_name.split("_", 1)[-1]


def variant_keys(key: str) -> dict[Precision, str]:
    return {p: f"{key}_{p.value}" for p in PRECISIONS}


def check_network_key(key: str, model_name: str, manifest: Manifest) -> str:
    """The key is well formed and its variant keys and Triton names are no other network's or the base's."""
    if not _KEY.fullmatch(key):
        raise VariantError(
            f"network key {key!r}: use a lower-case letter, then up to 19 lower-case letters or digits "
            f"(e.g. twin; --add-network KEY names it, the default is the model name after its first '_')"
        )
    taken = []
    for p, k in variant_keys(key).items():
        tname = f"{model_name}_{p.value}"
        if k in BASE_KEYS:
            taken.append(f"{k} is one of the repository's own keys {sorted(BASE_KEYS)}")
        for v in manifest.variants.values():
            if v.network == model_name:
                continue  # the same network again: its variants are replaced
            if v.key == k:
                taken.append(f"{k} is already {v.triton_name}'s key")
            elif v.triton_name == tname:
                taken.append(f"the Triton model {tname} is already variant {v.key}")
    if taken:
        raise VariantError(f"network key {key!r} collides: {'; '.join(taken)}: name another with --add-network KEY")
    return key


def add_network(
    checkpoint: str | Path,
    repository: str | Path,
    key: str | None = None,
    export_cfg: ExportConfig | None = None,
    data: Dataset | None = None,
    force: bool = False,
    tracking: bool = True,
) -> NetworkResult:
    """Export, gate, profile and publish the checkpoint's FP32 and INT8 as follow-up variants of `repository`.

    key: None = default_network_key. export_cfg overrides the checkpoint's export section (limit,
    threads, Triton settings). Raises VariantError when the checkpoint does not fit the repository,
    ExportGateError when its INT8 breaks the limit (unless force); either way nothing is published.
    """
    payload = load_checkpoint(checkpoint)
    cfg = config_from_dict(payload["config"])
    if export_cfg is not None:
        cfg = cfg.model_copy(update={"export": export_cfg})
    e, name = cfg.export, cfg.model.name
    repo = Path(repository).resolve()
    manifest = load_manifest(repo, verify_files=True)  # a damaged repository is refused before any work
    check_compatible(cfg, payload, manifest, repo, same_network=False)
    key = check_network_key(key or default_network_key(name), name, manifest)
    keys = variant_keys(key)
    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    val_x = to_normalized_tensor(data.val.images).numpy()  # (N, 3, 32, 32) float32, the serving input
    labels = data.val.labels
    log.info(
        "adding network %s to %s as %s (validation split: %d images)", name, repo, sorted(keys.values()), len(labels)
    )
    fp32_reference(repo, manifest, val_x, labels, e.ort_threads)  # refuses another validation split
    repo_int8_logits = run_batched(make_session(str(repo / manifest.variants["int8"].path), e.ort_threads), val_x)

    work = Path(tempfile.mkdtemp(prefix=f".{repo.name}.adding-", dir=repo.parent))
    try:
        # the serving version's files, linked (never written to), paths as a fresh export's (version 1)
        manifest = stage_serving_version(repo, work)
        for old in [v for v in manifest.variants.values() if v.network == name]:
            log.info("replacing variant %s of network %s (added before)", old.key, name)
            shutil.rmtree(work / old.triton_name, ignore_errors=True)
            del manifest.variants[old.key]
        _, float_model = restore_float_model(payload)
        converted = restore_converted_model(payload)
        paths = {keys[p]: model_dir(work, f"{name}_{p.value}") / "model.onnx" for p in PRECISIONS}
        log.info("exporting %s's FP32 (float network) and INT8 (converted QAT network) to ONNX", name)
        onnx_export.export_fp32(float_model, paths[keys[Precision.FP32]], cfg.data.image_size)
        onnx_export.export_int8(converted, paths[keys[Precision.INT8]], cfg.data.image_size)
        for path in paths.values():
            log.info("wrote %s (%.1f KB)", path, path.stat().st_size / 1e3)

        sessions = {k: make_session(str(p), e.ort_threads) for k, p in paths.items()}
        logits = {k: run_batched(s, val_x) for k, s in sessions.items()}
        fp32_logits, int8_logits = logits[keys[Precision.FP32]], logits[keys[Precision.INT8]]
        gates = {k: gate_variant(x, fp32_logits, labels, e.max_accuracy_drop) for k, x in logits.items()}
        for k, g in gates.items():
            log.info(
                "gate %s acc %.4f (its FP32 %.4f, drop %.2f points, limit %.2f) non-finite %d → %s",
                k,
                g.accuracy,
                gates[keys[Precision.FP32]].accuracy,
                g.accuracy_drop,
                e.max_accuracy_drop,
                g.non_finite,
                "pass" if g.passed else g.reason,
            )
        agreement = float((int8_logits.argmax(1) == repo_int8_logits.argmax(1)).mean())
        log.info("its INT8 agrees with the repository's INT8 on %.2f%% of the validation split", 100 * agreement)
        reasons = [f"{k}: {g.reason}" for k, g in gates.items() if not g.passed]
        if reasons and not force:
            raise ExportGateError(
                f"refusing to add network {name} to {repo}: {'; '.join(reasons)} "
                "(export.max_accuracy_drop sets the limit; --force publishes anyway); nothing was published"
            )
        for why in reasons:
            log.warning("publishing network %s despite the gate (forced): %s", name, why)

        parity = parity_vs_torch(int8_logits, predict_logits(converted, data.val.images), labels)
        profiles, int8_profile, ratios = profile_beside_int8(sessions, work, manifest, e, val_x[:64])

        for p in PRECISIONS:
            k, path = keys[p], paths[keys[p]]
            tname = path.parent.parent.name
            (path.parent.parent / "config.pbtxt").write_text(render_config(triton_spec(cfg, tname)))
            g = gates[k]
            manifest.variants[k] = VariantEntry(
                key=k,
                precision=p.value,
                triton_name=tname,
                path=str(path.relative_to(work)),
                sha256=sha256_file(path),
                size_bytes=path.stat().st_size,
                served=True,
                opt_in=False,
                network=name,
                followup_only=True,
                val_accuracy=g.accuracy,
                agreement_with_fp32=g.agreement_with_fp32,  # its own FP32
                max_abs_logit_diff=g.max_abs_logit_diff,
                latency=profiles[k],
            )
        manifest.networks[name] = _describe(
            checkpoint, payload, key, e, gates, keys, agreement, parity, ratios, reasons
        )
        save_manifest(work, manifest)
        log.info("plans and router left as they are: aq-fit-router adds plans across networks (export.plans)")
        version, published = add_serving_version(work, repo, source=str(checkpoint), detail=f"added network {name}")
        log.info(
            "network %s added to %s as version %d (serving; its variants are follow-ups only)", name, repo, version
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entries = {k: published.variants[k] for k in keys.values()}  # paths: <triton_name>/<version>/model.onnx
    result = NetworkResult(repo, name, key, version, entries, gates, agreement, parity, ratios, int8_profile)
    write_flavor(e, repo)
    if tracking and cfg.tracking.enabled:
        _log_to_mlflow(cfg, payload, result)
    return result


def _describe(
    checkpoint: str | Path,
    payload: dict[str, Any],
    key: str,
    e: ExportConfig,
    gates: dict[str, GateResult],
    keys: dict[Precision, str],
    agreement: float,
    parity: dict[str, float],
    ratios: dict[str, dict[str, float]],
    reasons: list[str],
) -> dict[str, Any]:
    """manifest.networks[<model name>]: the training run behind the network and what the export measured."""
    config = payload["config"]
    return {
        "key": key,
        "checkpoint": str(checkpoint),
        "mlflow_run_id": payload.get("mlflow_run_id"),
        "git_commit": payload.get("git_commit"),
        "config": {"model": config["model"], "train": config.get("train"), "augment": config.get("augment")},
        "metrics": payload.get("metrics", {}),
        "val_accuracy": {k: g.accuracy for k, g in gates.items()},
        "agreement_with_int8": agreement,
        "gate": {
            "limit_points": e.max_accuracy_drop,
            "drop_points": gates[keys[Precision.INT8]].accuracy_drop,
            "forced": bool(reasons),
        },
        "parity": parity,
        "time_vs_int8": ratios,
        "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _log_to_mlflow(cfg: ExperimentConfig, payload: dict[str, Any], result: NetworkResult) -> None:
    """Its gates, agreement, sizes and speed into its training run; register the variants that passed."""
    metrics = {f"export/{result.key}_agreement_with_int8": result.agreement_with_int8}
    for k, v in result.entries.items():
        g = result.gates[k]
        metrics |= {
            f"export/{k}_val_acc": g.accuracy,
            f"export/{k}_drop_points": g.accuracy_drop,
            f"export/{k}_agreement": g.agreement_with_fp32,
            f"export/{k}_size_bytes": float(v.size_bytes),
            f"export/{k}_b64_throughput": v.latency.at(64).throughput if v.latency else 0.0,
        }
        metrics |= {f"export/{k}_time_vs_int8_b{b}": r for b, r in result.time_vs_int8[k].items()}
    tags = {"exported": "true", "export.network": result.model_name, "export.repository": str(result.repository)}
    register = [v for k, v in result.entries.items() if result.gates[k].passed]
    log_to_training_run(cfg, payload, result.repository, tags, metrics, register)
