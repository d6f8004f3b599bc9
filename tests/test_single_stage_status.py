"""What single-stage routing runs on (no router in the repository, or planner.enabled false): each
variant's validation accuracy from manifest.json, said in one readable line at start-up and in
/v1/status; and a repository from before the pixel predictor was retired still serves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi.testclient import TestClient

from adaptive_quant.core.manifest import load_manifest, save_manifest
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from gateway_repo import b64_instance, build_repo, images

ACCURACY = {"fp32": 0.92, "fp16": 0.919, "int8": 0.91}  # gateway_repo's validation accuracies


def serve(repo: Path) -> TestClient:
    return TestClient(create_app(load_settings(overrides={"repository": str(repo)}, environ={})))


def start_up_line(caplog) -> str:
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    return line


def test_status_and_start_up_log_say_single_stage_routes_on_validation_accuracies(tmp_path, caplog):
    repo = build_repo(tmp_path / "r")  # no router in the manifest
    caplog.set_level(logging.INFO, logger="adaptive_quant.serving.app")
    with serve(repo) as client:
        status = client.get("/v1/status").json()
    single = status["single_stage"]
    assert single["in_use"] and single["source"] == "manifest" and single["unmeasured"] == []
    assert single["accuracy"] == ACCURACY
    assert single["summary"] == (
        "each variant's validation accuracy from manifest.json, the same for every sample: "
        "fp32 0.9200, fp16 0.9190, int8 0.9100"
    )
    assert not status["router"]["two_stage"] and "single-stage" in status["router"]["summary"]
    line = start_up_line(caplog)
    assert line.endswith(f"; single-stage routing on {single['summary']}") and "{" not in line


def test_a_variant_without_a_measured_accuracy_is_ranked_by_precision_and_said_so(tmp_path):
    repo = build_repo(tmp_path / "r")
    manifest = load_manifest(repo)
    manifest.variants["fp16"].val_accuracy = None
    save_manifest(repo, manifest)
    with serve(repo) as client:
        single = client.get("/v1/status").json()["single_stage"]
        r = client.post(
            "/v1/classify", json={"instances": [b64_instance(images(1)[0])]}, headers={"X-Priority": "quality"}
        )
    assert single["unmeasured"] == ["fp16"] and single["accuracy"]["fp16"] == 0.899  # below fp32's stand-in
    assert single["summary"].endswith("(no accuracy measured for fp16: ranked by precision)")
    assert r.status_code == 200 and r.headers["X-Precision"] == "fp32"  # fp32's measured 0.92 still ranks first


def test_a_repository_from_before_the_pixel_predictor_was_retired_still_serves(tmp_path, caplog):
    repo = build_repo(tmp_path / "r")
    # what the retired predictor stage left behind: a manifest entry and its folder
    path = repo / "manifest.json"
    data = json.loads(path.read_text())
    data["predictor"] = {
        "path": "accuracy_predictor/1/predictor.npz",
        "sha256": "0" * 64,
        "variant_keys": ["fp32", "fp16", "int8"],
        "feature_version": 1,
    }
    path.write_text(json.dumps(data, indent=2))
    (repo / "accuracy_predictor" / "1").mkdir(parents=True)
    (repo / "accuracy_predictor" / "1" / "predictor.npz").write_bytes(b"old weights")
    caplog.set_level(logging.INFO)
    with serve(repo) as client:
        status = client.get("/v1/status").json()
        r = client.post("/v1/classify", json={"instances": [b64_instance(images(1)[0])]})
    assert r.status_code == 200 and status["ready"]
    assert status["single_stage"]["in_use"] and status["single_stage"]["accuracy"] == ACCURACY
    told = [rec for rec in caplog.records if rec.name == "adaptive_quant.core.manifest"]
    assert told and all(rec.levelno == logging.WARNING for rec in told)
    assert "pixel predictor was retired" in told[0].getMessage() and "ignored" in told[0].getMessage()
    # the next write of the manifest (e.g. aq-export --add-variant) leaves the entry out
    save_manifest(repo, load_manifest(repo))
    assert "predictor" not in json.loads(path.read_text())


def test_the_shipped_repository_loads_without_the_retirement_warning(caplog):
    shipped = Path(__file__).resolve().parents[1] / "model_repository"
    caplog.set_level(logging.INFO, logger="adaptive_quant.core.manifest")
    manifest = load_manifest(shipped)
    assert manifest.router is not None  # it routes two-stage; single-stage is the fallback
    assert not [r for r in caplog.records if r.name == "adaptive_quant.core.manifest"]
    assert not (shipped / "accuracy_predictor").exists()
