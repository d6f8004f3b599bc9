"""Export a trained checkpoint into a Triton model repository: FP32, FP16 and INT8 (QAT) ONNX
variants (+ a PTQ INT8 baseline for reports), each validated on the validation split, gated
against FP32, latency-profiled with ONNX Runtime, and described in manifest.json.

  python scripts/export.py --checkpoint runs/default/best.pt                      # → model_repository/
  python scripts/export.py --checkpoint runs/smoke/best.pt --repository /tmp/repo
  python scripts/export.py --checkpoint runs/default/best.pt --set export.max_accuracy_drop=0.5

Nothing is published unless every served variant passes the gate (--force overrides it); the
repository is assembled aside and published only when complete. Into a fresh folder it becomes
version 1 (`<name>/1/model.onnx`); into an existing repository it is added as the next version N
(`<name>/N/model.onnx`, router/N/, manifests/N.json), which serves at once: the earlier versions'
files are never touched (versions.json records them; to canary a version instead, export into a
fresh folder and run aq-rollout).

A pruned checkpoint becomes an extra, opt-in INT8 variant of an existing repository, gated against
that repository's FP32 (limit export.max_pruned_accuracy_drop, 1.5 points) and profiled beside its INT8:

  python scripts/export.py --checkpoint runs/prune50/best.pt --repository model_repository --add-variant
  #   → model_repository/cifar_resnet_int8_pruned50/N/ in a new version N that also links the serving
  #     version's files (the key says the share; --add-variant int8_<tag> names it)

A second network (another model name, trained with the same experiment seed, so validated on the same
images) joins an existing repository as follow-up variants: its FP32 and INT8, gated against its own
FP32 (export.max_accuracy_drop), profiled beside the repository's INT8, never the entry pass:

  python scripts/export.py --checkpoint runs/twin/best.pt --repository model_repository --add-network
  #   → cifar_twin_fp32/N/, cifar_twin_int8/N/ as variants twin_fp32, twin_int8 of a new version N
  #     (the key is the model name after its first '_'; --add-network KEY names it). Plans and router
  #     stay as they were: aq-fit-router then adds plans across networks (export.plans).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptive_quant.cli import LOG_LEVELS, setup_logging
from adaptive_quant.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
)
from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.data import DataError
from adaptive_quant.export.network import NetworkResult, add_network
from adaptive_quant.export.pipeline import ExportGateError, build_repository
from adaptive_quant.export.variant import VariantError, VariantResult, add_variant
from adaptive_quant.export.versions import VersionError
from adaptive_quant.tracking import name_runs_after
from adaptive_quant.training.checkpoint import CheckpointError, load_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default="runs/default/best.pt", help="checkpoint from scripts/train.py (default: %(default)s)"
    )
    p.add_argument("--repository", help="output folder (default: the checkpoint config's export.repository)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of the checkpoint's config, e.g. --set export.triton_flavor=python",
    )
    p.add_argument(
        "--triton-flavor",
        choices=["onnxruntime", "python"],
        help="python: also write <repository>_python for the local tritonserver of nvidia-pytriton",
    )
    p.add_argument(
        "--add-variant",
        nargs="?",
        const="",
        metavar="KEY",
        help="add the checkpoint's converted INT8 network to the existing --repository as variant KEY "
        "(default int8_pruned<share>, from prune.amount) instead of building a repository; opt-in for the gateway",
    )
    p.add_argument(
        "--add-network",
        nargs="?",
        const="",
        metavar="KEY",
        help="add the checkpoint's FP32 and INT8 (another network, same data and seed) to the existing "
        "--repository as follow-up variants KEY_fp32, KEY_int8 (default KEY: the model name after its first '_', "
        "cifar_twin → twin); served as second opinions, never the entry pass",
    )
    p.add_argument("--force", action="store_true", help="publish even if a variant fails the accuracy gate")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow or register models")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    name_runs_after(Path(args.checkpoint).parent, args.overrides)  # runs/default/best.pt → export-default-...
    try:
        payload = load_checkpoint(args.checkpoint)
        data = apply_overrides(dict(payload["config"]), args.overrides)
        if args.repository:
            data["export"] = {**data.get("export", {}), "repository": args.repository}
        if args.triton_flavor:
            data["export"] = {**data.get("export", {}), "triton_flavor": args.triton_flavor}
        cfg = config_from_dict(data)
        if args.add_variant is not None and args.add_network is not None:
            raise VariantError("--add-variant and --add-network add different things: give one of them")
        # the two ways to add to an existing repository: (flag value, what it adds, the function, its report)
        for given, what, add, show in (
            (args.add_network, "network", add_network, print_network),
            (args.add_variant, "variant", add_variant, print_added),
        ):
            if given is None:
                continue
            if not args.repository:
                raise VariantError(f"--add-{what} needs --repository: the existing repository to add the {what} to")
            show(
                add(
                    args.checkpoint,
                    args.repository,
                    given or None,
                    cfg.export,
                    force=args.force,
                    tracking=not args.no_mlflow,
                )
            )
            return 0
        result = build_repository(args.checkpoint, cfg.export, force=args.force, tracking=not args.no_mlflow)
    except (ConfigError, DataError, CheckpointError, ManifestError, ExportGateError, VariantError, VersionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    fp32 = m.variants["fp32"]
    print(f"\nrepository: {result.repository}, version {m.version} (serving)")
    print(
        f"{'variant':10}{'served':>7}{'val acc':>9}{'agree':>8}{'size KB':>9}{'×fp32':>7}{'b1 p50 ms':>11}{'b64 img/s':>11}{'×fp32':>7}"
    )
    for k, v in m.variants.items():
        b1, b64 = v.latency.at(1), v.latency.at(64)
        print(
            f"{k:10}{'yes' if v.served else 'no':>7}{v.val_accuracy:>9.2%}{v.agreement_with_fp32:>8.2%}"
            f"{v.size_bytes / 1e3:>9.1f}{v.size_bytes / fp32.size_bytes:>7.2f}{b1.p50_ms:>11.3f}"
            f"{b64.throughput:>11.0f}{b64.throughput / fp32.latency.at(64).throughput:>7.2f}"
        )
    host = fp32.latency.host
    print(f"(latency measured on {host['cpu']}, {host['threads']} threads, ONNX Runtime {host['onnxruntime']})")
    p = m.training.get("parity", {})
    if p:
        print(
            f"ORT vs torch: FP32 max|Δ| {p['fp32']['max_abs_diff_vs_torch']:.2e}; INT8 max|Δ| "
            f"{p['int8']['max_abs_diff_vs_torch']:.3f}, top-1 agreement {p['int8']['top1_agreement_vs_torch']:.2%}, "
            f"accuracy ORT {m.variants['int8'].val_accuracy:.2%} vs torch {p['int8']['torch_accuracy']:.2%}"
        )
    return 0


def print_added(r: VariantResult) -> None:
    v, g = r.entry, r.gate
    version = Path(v.path).parent.name  # <triton_name>/<N>/model.onnx
    print(
        f"\nrepository: {r.repository}: added {v.triton_name} in version {version}, serving "
        "(opt-in: the gateway routes to it only when named)"
    )
    print(
        f"val acc {g.accuracy:.2%} (FP32 {r.fp32_val_accuracy:.2%}, drop {g.accuracy_drop:.2f} points), "
        f"agreement with FP32 {g.agreement_with_fp32:.2%}, {v.size_bytes / 1e3:.1f} KB"
    )
    print(f"{'batch':>6}{'p50 ms':>9}{'INT8 p50 ms':>13}{'× INT8':>8}{'img/s':>8}")
    for b, ratio in r.time_vs_int8.items():
        print(
            f"{b:>6}{v.latency.batches[b].p50_ms:>9.3f}{r.int8_latency.batches[b].p50_ms:>13.3f}"
            f"{ratio:>8.2f}{v.latency.batches[b].throughput:>8.0f}"
        )
    p = r.parity
    print(
        f"ORT vs torch: max|Δ| {p['max_abs_diff_vs_torch']:.3f}, top-1 agreement {p['top1_agreement_vs_torch']:.2%}, "
        f"accuracy ORT {g.accuracy:.2%} vs torch {p['torch_accuracy']:.2%}"
    )


def print_network(r: NetworkResult) -> None:
    int8 = r.entries[f"{r.key}_int8"]
    print(
        f"\nrepository: {r.repository}: added network {r.model_name} in version {r.version}, serving "
        "(follow-ups only: never the entry pass; plans and router unchanged, aq-fit-router adds them, from export.plans)"
    )
    print(f"{'variant':12}{'val acc':>9}{'drop':>7}{'agree with its FP32':>21}{'size KB':>9}")
    for k, v in r.entries.items():
        g = r.gates[k]
        print(
            f"{k:12}{g.accuracy:>9.2%}{g.accuracy_drop:>7.2f}{g.agreement_with_fp32:>21.2%}{v.size_bytes / 1e3:>9.1f}"
        )
    print(f"its INT8 agrees with the repository's INT8 on {r.agreement_with_int8:.2%} of the validation split")
    print(f"{'batch':>6}" + "".join(f"{k + ' × INT8':>20}" for k in r.entries) + f"{'INT8 p50 ms':>13}")
    for b, point in r.int8_latency.batches.items():
        print(f"{b:>6}" + "".join(f"{r.time_vs_int8[k][b]:>20.2f}" for k in r.entries) + f"{point.p50_ms:>13.3f}")
    p = r.parity
    print(
        f"ORT vs torch (INT8): max|Δ| {p['max_abs_diff_vs_torch']:.3f}, top-1 agreement "
        f"{p['top1_agreement_vs_torch']:.2%}, accuracy ORT {r.gates[int8.key].accuracy:.2%} vs torch {p['torch_accuracy']:.2%}"
    )


if __name__ == "__main__":
    sys.exit(main())
