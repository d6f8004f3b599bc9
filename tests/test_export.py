"""Export of the smoke model: variants, Triton configs against the ONNX files, manifest, the gate."""

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from adaptive_quant.config import ExportConfig
from adaptive_quant.core.manifest import ManifestError, load_manifest, sha256_file
from adaptive_quant.export import onnx_export
from adaptive_quant.export import pipeline as export_mod
from adaptive_quant.export.pipeline import ExportGateError, build_repository
from conftest import EXPORT_FAST

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}
FAST = EXPORT_FAST


@pytest.fixture(scope="module")
def smoke_repo(smoke_export):
    return smoke_export  # shared with tests/test_export_variant.py, which works on a copy


def test_repository_layout_has_every_variant(smoke_repo) -> None:
    repo, out = smoke_repo
    for name in ("cifar_resnet_fp32", "cifar_resnet_fp16", "cifar_resnet_int8", "cifar_resnet_int8_ptq"):
        assert (repo / name / "config.pbtxt").is_file()
        assert (repo / name / "1" / "model.onnx").is_file()
    assert (repo / "manifest.json").is_file()
    assert not list(repo.parent.glob(".model_repository.building-*")), "no temporary folder left behind"


def test_every_config_matches_its_onnx_model(smoke_repo) -> None:
    repo, _ = smoke_repo
    for cfg_path in repo.glob("*/config.pbtxt"):
        config = text_format.Parse(cfg_path.read_text(), model_config_pb2.ModelConfig())  # real Triton schema
        assert config.name == cfg_path.parent.name
        assert config.backend == "onnxruntime"
        assert config.max_batch_size == 64
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert len(config.instance_group) == 1
        sig = onnx_export.io_signature(cfg_path.parent / "1" / "model.onnx")
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            (n, ONNX_TO_TRITON[t], [int(d) for d in dims[1:]]) for n, t, dims in sig["inputs"]
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
            (n, ONNX_TO_TRITON[t], [int(d) for d in dims[1:]]) for n, t, dims in sig["outputs"]
        ]
        # the batch dimension is dynamic in the file, as Triton's batching needs
        assert isinstance(sig["inputs"][0][2][0], str)


def test_all_variants_share_one_contract(smoke_repo) -> None:
    repo, out = smoke_repo
    sigs = [onnx_export.io_signature(repo / v.path) for v in out.manifest.variants.values()]
    assert all(s == sigs[0] for s in sigs)
    assert sigs[0]["inputs"][0][0] == "images" and sigs[0]["outputs"][0][0] == "logits"


def test_int8_variant_is_qdq_and_smaller(smoke_repo) -> None:
    repo, out = smoke_repo
    ops = {n.op_type for n in onnx.load(str(repo / out.manifest.variants["int8"].path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp16_ops = {n.op_type for n in onnx.load(str(repo / out.manifest.variants["fp16"].path)).graph.node}
    assert "Cast" in fp16_ops


def test_manifest_describes_files_gate_and_profile(smoke_repo) -> None:
    repo, out = smoke_repo
    m = load_manifest(repo, verify_files=True)  # sha256 of every file matches
    assert {k for k, v in m.variants.items() if v.served} == {"fp32", "fp16", "int8"}
    assert m.variants["int8_ptq"].served is False
    for v in m.variants.values():
        assert v.sha256 == sha256_file(repo / v.path)
        assert v.size_bytes == (repo / v.path).stat().st_size
        assert set(v.latency.batches) == {"1", "8"}
        assert v.latency.host["cpu"] and v.latency.batches["8"].throughput > 0
        assert 0 <= v.val_accuracy <= 1
    assert m.variants["fp32"].agreement_with_fp32 == 1.0
    assert m.training["config"]["seed"] == 42


def test_onnx_runtime_matches_torch(smoke_repo) -> None:
    _, out = smoke_repo
    p = out.parity
    assert p["fp32"]["max_abs_diff_vs_torch"] < 1e-4
    assert abs(out.manifest.variants["fp32"].val_accuracy - p["fp32"]["torch_accuracy"]) < 1e-9
    # INT8: ORT's integer kernels round differently from torch's reference ops in places;
    # the accuracy must still match to 0.5 point on the small smoke validation split (200 images)
    assert abs(out.manifest.variants["int8"].val_accuracy - p["int8"]["torch_accuracy"]) <= 0.005
    assert p["int8"]["top1_agreement_vs_torch"] >= 0.98


def test_damaged_variant_is_refused_and_nothing_is_published(smoke_run, tmp_path, monkeypatch) -> None:
    """Failure injection: the INT8 export is sabotaged (weights scrambled) after it is written."""
    _, result, _ = smoke_run
    real_export_int8 = onnx_export.export_int8

    def fake_damaged_export_int8(converted, path, image_size=32):
        real_export_int8(converted, path, image_size)
        model = onnx.load(str(path))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4:  # conv weights
                arr = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(rng.permutation(arr.ravel()).reshape(arr.shape), init.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(export_mod.onnx_export, "export_int8", fake_damaged_export_int8)
    repo = tmp_path / "model_repository"
    with pytest.raises(ExportGateError, match=r"int8: accuracy .* points below FP32"):
        build_repository(result.checkpoint, ExportConfig(repository=str(repo), **FAST), tracking=False)
    assert not repo.exists()
    assert list(tmp_path.iterdir()) == []  # not even the temporary folder


def test_manifest_detects_a_replaced_file(smoke_repo, tmp_path) -> None:
    import shutil

    repo, _ = smoke_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    (copy / "cifar_resnet_int8" / "1" / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(ManifestError, match="int8.*sha256"):
        load_manifest(copy, verify_files=True)


def test_onnx_runtime_runs_every_int8_convolution_as_integer_kernel(smoke_repo, tmp_path) -> None:
    """Regression: an unquantized conv output (conv+add fusion in the X86 recipe) left float Convs
    in the graph that dequantized their weights on every call: INT8 ran slower than FP32."""
    import collections

    import onnxruntime as ort

    repo, out = smoke_repo
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(repo / out.manifest.variants["int8"].path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    n_conv = sum(1 for n in onnx.load(str(repo / out.manifest.variants["fp32"].path)).graph.node if n.op_type == "Conv")
    assert ops["Conv"] == 0, ops
    assert ops["QLinearConv"] == n_conv
