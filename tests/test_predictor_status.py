"""What the gateway says about its accuracy predictor: one readable line at start-up and in /v1/status,
the structured detail beside it (never the manifest entry's repr with its 62 feature names)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adaptive_quant.core.manifest import load_manifest, save_manifest
from adaptive_quant.predictor.runtime import describe_mlp
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from gateway_repo import build_repo

ROOT = Path(__file__).resolve().parents[1]
AUROC = {"fp32": 0.5745, "fp16": 0.5780, "int8": 0.5709}


def add_trained_predictor(root: Path, hidden: int = 16) -> None:
    """A random-weight MLP saved the way the predictor stage saves one, with its spec and test metrics."""
    from adaptive_quant.predictor.features import FEATURE_NAMES, FEATURE_VERSION
    from adaptive_quant.predictor.model import save_predictor

    rng = np.random.default_rng(0)
    keys, f = ["fp32", "fp16", "int8"], len(FEATURE_NAMES)
    weights = {
        "feat_mean": np.zeros(f, np.float32),
        "feat_std": np.full(f, 50.0, np.float32),
        "calib_scale": np.ones(3, np.float32),
        "calib_bias": np.zeros(3, np.float32),
        "w0": rng.normal(0, 0.3, (f, hidden)).astype(np.float32),
        "b0": np.zeros(hidden, np.float32),
        "w1": rng.normal(0, 0.3, (hidden, 3)).astype(np.float32),
        "b1": np.full(3, 2.0, np.float32),
    }
    spec = {
        "version": 1,
        "variant_keys": keys,
        "feature_version": FEATURE_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "num_features": f,
        "hidden": [hidden],
        "parameters": f * hidden + hidden + hidden * 3 + 3,
        "trained_on": "validation split (150 fit, 50 calibration), seed 0",
        "metrics": {"auroc_error": AUROC, "ece_calibrated": dict.fromkeys(keys, 0.01)},
    }
    manifest = load_manifest(root)
    manifest.predictor = save_predictor(root, weights, spec)
    save_manifest(root, manifest)


def serve(repo: Path) -> TestClient:
    return TestClient(create_app(load_settings(overrides={"repository": str(repo)}, environ={})))


def test_status_and_start_up_log_give_one_readable_line_for_the_trained_predictor(tmp_path, caplog):
    repo = build_repo(tmp_path / "r")
    add_trained_predictor(repo)
    caplog.set_level(logging.INFO, logger="adaptive_quant.serving.app")
    with serve(repo) as client:
        predictor = client.get("/v1/status").json()["predictor"]
    assert predictor["kind"] == "mlp"
    summary = predictor["summary"]
    assert summary == (
        "mlp 16 (1059 parameters) over 62 image features; "
        "AUROC at flagging errors fp32 0.57, fp16 0.58, int8 0.57 (test split)"
    )
    detail = predictor["detail"]
    assert detail["features"] == 62 and detail["hidden"] == [16] and detail["variant_keys"] == ["fp32", "fp16", "int8"]
    assert detail["metrics"]["auroc_error"] == AUROC
    assert detail["path"] == "accuracy_predictor/1/predictor.npz"

    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    assert line.endswith(f"predictor: {summary}")
    assert "{" not in line and "thumb_0_0_r" not in line and "feature_names" not in line


def test_status_says_why_the_gateway_routes_on_priors(tmp_path, caplog):
    repo = build_repo(tmp_path / "r")  # the manifest names no predictor
    caplog.set_level(logging.INFO, logger="adaptive_quant.serving.app")
    with serve(repo) as client:
        predictor = client.get("/v1/status").json()["predictor"]
    assert predictor["kind"] == "prior"
    assert predictor["summary"].startswith("prior: each variant's validation accuracy for every sample")
    assert "manifest.json has no predictor entry" in predictor["summary"]
    assert predictor["detail"]["reason"] == "manifest.json has no predictor entry"
    assert set(predictor["detail"]["accuracy"]) == {"fp32", "fp16", "int8"}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    assert "predictor: prior: each variant's validation accuracy" in line and "{" not in line


@pytest.mark.skipif(not (ROOT / "model_repository" / "manifest.json").is_file(), reason="no shipped repository")
def test_the_shipped_predictor_reads_as_one_line():
    manifest = load_manifest(ROOT / "model_repository")
    summary, detail = describe_mlp(manifest.predictor, ROOT / "model_repository")
    assert summary.startswith("mlp 64-32 (6211 parameters) over 62 image features; AUROC at flagging errors fp32 0.")
    assert len(summary) < 130 and detail["features"] == 62
