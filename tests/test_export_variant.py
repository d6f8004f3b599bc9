"""A pruned checkpoint added to an existing repository as its own INT8 variant (`aq-export --add-variant`):
its channel counts, ORT against torch, the gate against the repository's FP32, and a gateway that
routes to it only when told."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from adaptive_quant.cli.export import main as export_main
from adaptive_quant.config import ExportConfig
from adaptive_quant.core.manifest import load_manifest, sha256_file
from adaptive_quant.core.versions import load_version_manifest, read_index
from adaptive_quant.data import load_dataset
from adaptive_quant.export.ort_eval import make_session, run_batched
from adaptive_quant.export.variant import VariantError, add_variant
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from adaptive_quant.training.augment import to_normalized_tensor
from adaptive_quant.training.checkpoint import load_checkpoint, restore_float_model, save_checkpoint
from adaptive_quant.training.engine import predict_logits
from adaptive_quant.training.prune import prune_channels
from adaptive_quant.training.quantize import convert, prepare_qat, set_qat_mode
from checkpoints import rotate_head
from conftest import EXPORT_FAST
from gateway_repo import b64_instance, images

FAST = EXPORT_FAST
# smoke widths [8, 16, 32, 32], inner [] (one width per stage), halved by prune.amount 0.5
PRUNED_WIDTHS = [4, 8, 16, 16]


@pytest.fixture(scope="module")
def base_repo(smoke_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("variant") / "repo"
    shutil.copytree(smoke_export[0], repo)  # the session's smoke repository, left as it is for the others
    return repo


@pytest.fixture(scope="module")
def pruned(smoke_run, tmp_path_factory):
    """(checkpoint, torch INT8 val logits) of the smoke network pruned by half and quantized.

    Built here without the training loops (tests/test_prune.py runs prune → fine-tune → QAT
    through the pipeline): prune_channels, then the QAT graph's observers calibrated on a few
    training batches, saved as the pipeline saves it.
    """
    cfg, result, _ = smoke_run
    payload = load_checkpoint(result.checkpoint)
    _, float_model = restore_float_model(payload)
    model, model_cfg = prune_channels(float_model, cfg.model, amount=0.5)
    pruned_cfg = cfg.model_copy(
        update={"model": model_cfg, "prune": cfg.prune.model_copy(update={"enabled": True, "amount": 0.5})}
    )
    data = load_dataset(cfg.data, cfg.seed)
    prepared = prepare_qat(model, cfg.data.image_size)
    set_qat_mode(prepared, train=True, freeze_bn=True, freeze_observers=False)
    with torch.no_grad():
        for i in range(0, 256, 64):
            prepared(to_normalized_tensor(data.train.images[i : i + 64]))
    set_qat_mode(prepared, train=False, freeze_bn=True, freeze_observers=True)
    torch_logits = predict_logits(convert(prepared), data.val.images)
    path = save_checkpoint(
        tmp_path_factory.mktemp("pruned") / "best.pt",
        pruned_cfg,
        model.state_dict(),
        prepared.state_dict(),
        {},
        extra={"classes": payload["classes"], "mlflow_run_id": None},
    )
    return path, torch_logits


@pytest.fixture(scope="module")
def pruned_checkpoint(pruned):
    return pruned[0]


@pytest.fixture(scope="module")
def added(base_repo, pruned_checkpoint):
    before = load_manifest(base_repo)
    # synthetic data: the limit is not what this fixture is about (the refusal test is)
    cfg = ExportConfig(repository=str(base_repo), max_pruned_accuracy_drop=100.0, max_shift_drop=100.0, **FAST)
    result = add_variant(pruned_checkpoint, base_repo, export_cfg=cfg, tracking=False)
    return before, result


def _conv_shapes(path) -> list[tuple[int, int]]:
    """(out, in) channels of every conv weight in the ONNX file, in graph order (QDQ: the int8 initializers)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        name = node.input[1]
        while name not in inits:  # walk back through DequantizeLinear (and any Identity) to the stored tensor
            name = producer[name].input[0]
        shapes.append(tuple(inits[name].shape[:2]))
    return shapes


def test_the_pruned_variant_has_the_stated_channel_counts(added, pruned_checkpoint) -> None:
    _, r = added
    payload = load_checkpoint(pruned_checkpoint)
    assert payload["config"]["model"]["widths"] == PRUNED_WIDTHS
    _, float_model = restore_float_model(payload)
    expected = [(m.out_channels, m.in_channels) for m in float_model.modules() if isinstance(m, torch.nn.Conv2d)]
    shapes = _conv_shapes(r.repository / r.entry.path)
    assert shapes == expected
    assert shapes[0] == (4, 3)  # the stem, 8 → 4
    assert {o for o, _ in shapes} == set(PRUNED_WIDTHS)
    full = _conv_shapes(r.repository / load_manifest(r.repository).variants["int8"].path)
    assert [o for o, _ in full] == [2 * o for o, _ in shapes]  # every conv kept half its filters


def test_onnx_runtime_matches_torch_on_the_pruned_variant(added, pruned, smoke_run) -> None:
    cfg, _, _ = smoke_run
    _, r = added
    _, torch_logits = pruned
    val = load_dataset(cfg.data, cfg.seed).val
    ort_logits = run_batched(make_session(str(r.repository / r.entry.path)), to_normalized_tensor(val.images).numpy())
    # INT8: the two runtimes round a few values differently, a quantization step or so
    assert np.abs(ort_logits - torch_logits).max() < 0.25
    assert (ort_logits.argmax(1) == torch_logits.argmax(1)).mean() >= 0.98
    assert r.parity["top1_agreement_vs_torch"] == pytest.approx((ort_logits.argmax(1) == torch_logits.argmax(1)).mean())


def test_the_variant_joins_the_manifest_opt_in_beside_untouched_variants(added) -> None:
    before, r = added
    m = load_manifest(r.repository, verify_files=True)  # every sha256 matches its file
    v = m.variants["int8_pruned50"]
    assert v.triton_name == "cifar_resnet_int8_pruned50" and v.precision == "int8"
    assert v.served and v.opt_in and v.val_accuracy == r.gate.accuracy
    assert set(v.latency.batches) == set(m.variants["int8"].latency.batches)  # the repository's batch sizes
    assert v.size_bytes < m.variants["int8"].size_bytes
    for k, old in before.variants.items():  # the repository's own variants, plans and router are kept
        assert m.variants[k].sha256 == old.sha256 and m.variants[k].latency == old.latency
    assert m.plans == before.plans
    # added as version 2, serving: every file of it under <name>/2/ and router/2/, version 1's left as they were
    assert m.version == 2 and before.version == 1 and v.path == "cifar_resnet_int8_pruned50/2/model.onnx"
    assert {x.path for x in m.variants.values()} == {f"{x.triton_name}/2/model.onnx" for x in m.variants.values()}
    assert m.router == {**before.router, "path": "router/2/deferral.npz", "spec_path": "router/2/deferral.json"}
    for old in before.variants.values():
        assert sha256_file(r.repository / old.path) == old.sha256  # version 1's file, untouched
    assert load_version_manifest(r.repository, 1) == before
    assert read_index(r.repository).serving == 2
    assert [x.key for x in m.routed_variants()] == [x.key for x in before.routed_variants()]
    assert m.training["extra_variants"]["int8_pruned50"]["config"]["model"]["widths"] == PRUNED_WIDTHS
    config = text_format.Parse(
        (r.repository / v.triton_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.name == v.triton_name and config.backend == "onnxruntime"
    assert not list(r.repository.parent.glob(".repo.*")), "no temporary folder left behind"


def test_the_gateway_routes_to_it_only_when_named(added) -> None:
    _, r = added

    def entry_passes(**overrides) -> tuple[list[str], list[str]]:
        settings = load_settings(overrides={"repository": str(r.repository), **overrides}, environ={})
        with TestClient(create_app(settings)) as client:
            resp = client.post("/v1/classify", json={"instances": [b64_instance(i) for i in images(4, seed=3)]})
            assert resp.status_code == 200, resp.text
            keys = [v["key"] for v in client.get("/v1/status").json()["variants"]]
            return keys, [p["passes"][0] for p in resp.json()["predictions"]]

    keys, entries = entry_passes()
    assert "int8_pruned50" not in keys and entries == ["int8"] * 4  # cheaper, but never taken by surprise
    keys, entries = entry_passes(variants=["int8_pruned50", "fp32"])
    assert sorted(keys) == ["fp32", "int8_pruned50"] and entries == ["int8_pruned50"] * 4


def test_the_gate_refuses_a_pruned_variant_that_breaks_the_limit(added, pruned_checkpoint, tmp_path, capsys) -> None:
    _, r = added
    broken = tmp_path / "broken.pt"
    rotate_head(pruned_checkpoint, broken)
    manifest_before = (r.repository / "manifest.json").read_bytes()
    argv = ["--checkpoint", str(broken), "--repository", str(r.repository), "--add-variant", "int8_pruned50b"]
    assert export_main([*argv, "--no-mlflow", "--set", "export.profile_seconds=0.05"]) == 2
    err = capsys.readouterr().err
    assert "refusing to add int8_pruned50b" in err and "points below FP32" in err and "limit 1.50 points" in err
    assert (r.repository / "manifest.json").read_bytes() == manifest_before  # nothing published
    assert not (r.repository / "cifar_resnet_int8_pruned50b").exists()
    assert not list(r.repository.parent.glob(".repo.*")), "no temporary folder left behind"


def test_a_variant_key_must_not_replace_the_repository_s_own(added, pruned_checkpoint) -> None:
    _, r = added
    with pytest.raises(VariantError, match="variant key 'int8'"):
        add_variant(pruned_checkpoint, r.repository, key="int8", tracking=False)
    assert export_main(["--checkpoint", str(pruned_checkpoint), "--add-variant", "--no-mlflow"]) == 2  # no --repository
