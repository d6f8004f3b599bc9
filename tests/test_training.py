"""The smoke pipeline end to end: float → QAT → converted INT8, checkpoint, MLflow run."""

import numpy as np
import pytest
import torch

from adaptive_quant.data import load_dataset
from adaptive_quant.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_converted_model,
    restore_float_model,
)
from adaptive_quant.training.engine import predict_logits
from adaptive_quant.training.quantize import prepare_qat, set_qat_mode

# Converted INT8 vs fake-quant graph: the same arithmetic up to where BN is folded and how
# rounding is done, so top-1 must agree on nearly every sample and logits stay close.
AGREEMENT_MIN = 0.97  # share of samples with the same top-1 class
LOGIT_DIFF_MAX = 0.05  # mean |Δlogit| as a share of the logits' standard deviation


def test_smoke_run_trains_converts_and_reports(smoke_run) -> None:
    cfg, result, _ = smoke_run
    m = result.metrics
    for key in ("float_val_acc", "fp32_test_acc", "int8_val_acc", "int8_test_acc", "total_seconds"):
        assert key in m
    # synthetic classes are learnable: far above the 10% of chance, for FP32 and converted INT8
    assert m["fp32_test_acc"] > 0.5
    assert m["int8_test_acc"] > 0.5
    assert abs(m["int8_test_acc"] - m["fp32_test_acc"]) < 0.1
    assert result.checkpoint.is_file()


def test_converted_int8_agrees_with_fake_quant(smoke_run) -> None:
    cfg, result, _ = smoke_run
    payload = load_checkpoint(result.checkpoint)
    _, float_model = restore_float_model(payload)
    prepared = prepare_qat(float_model)
    prepared.load_state_dict(payload["qat_state"])
    set_qat_mode(prepared, train=False, freeze_bn=True, freeze_observers=True)
    converted = restore_converted_model(payload)
    val = load_dataset(cfg.data, cfg.seed).val
    fq = predict_logits(prepared, val.images)
    q = predict_logits(converted, val.images)
    agreement = float((fq.argmax(1) == q.argmax(1)).mean())
    rel_diff = float(np.abs(fq - q).mean() / fq.std())
    assert agreement >= AGREEMENT_MIN, f"top-1 agreement {agreement:.3f}"
    assert rel_diff <= LOGIT_DIFF_MAX, f"mean |Δlogit| / std = {rel_diff:.4f}"
    # and the converted graph really is quantized: it holds int8 weights
    assert any(b.dtype == torch.int8 for b in list(converted.parameters()) + list(converted.buffers())) or any(
        "quantize_per" in str(n.target) for n in converted.graph.nodes
    )


def test_checkpoint_reproduces_the_run_accuracy(smoke_run) -> None:
    cfg, result, _ = smoke_run
    payload = load_checkpoint(result.checkpoint)
    assert payload["config"]["seed"] == cfg.seed  # the resolved config travels with the weights
    test = load_dataset(cfg.data, cfg.seed).test
    converted = restore_converted_model(payload)
    acc = float((predict_logits(converted, test.images).argmax(1) == test.labels).mean())
    assert acc == pytest.approx(result.metrics["int8_test_acc"], abs=1e-6)


def test_checkpoint_loader_refuses_foreign_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an adaptive-quant checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")


def test_mlflow_run_holds_params_metrics_artifacts_and_commit(smoke_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, uri = smoke_run
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.params["seed"] == "42"
    assert "git_commit" in run.data.tags
    history = client.get_metric_history(result.run_id, "float/val_acc")
    assert [h.step for h in history] == list(range(cfg.train.epochs))
    assert len(client.get_metric_history(result.run_id, "qat/int8_val_acc")) == cfg.qat.epochs
    assert len(client.get_metric_history(result.run_id, "float/lr")) == cfg.train.epochs
    assert run.data.metrics["int8_test_acc"] == pytest.approx(result.metrics["int8_test_acc"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoint")] == ["checkpoint/best.pt"]
