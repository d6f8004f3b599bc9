"""Two-stage routing through the real gateway: entry pass, follow-ups, deadline cuts, failures, floor."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adaptive_quant.core.manifest import PlanEntry, load_manifest, save_manifest
from adaptive_quant.data import make_synthetic
from adaptive_quant.export.plans import fit_router
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.settings import load_settings
from fake_backends import FakeFlakyBackend
from gateway_repo import b64_instance, build_repo, images
from prometheus_scrape import metric

PLANS = ["none", "int8:hflip", "fp32", "fp32:hflip"]


class FakePlanRouter:
    """Test double for the router predictor: the same predicted p(right | plan) for every sample."""

    plan_names = PLANS

    def __init__(self, **acc: float) -> None:
        row = {"none": 0.5, "int8:hflip": 0.5, "fp32": 0.5, "fp32:hflip": 0.5}
        row.update({k.replace("__", ":"): v for k, v in acc.items()})
        self.row = np.array([row[p] for p in PLANS])

    def predict(self, entry_logits: np.ndarray) -> np.ndarray:
        return np.tile(self.row, (len(entry_logits), 1))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


@contextmanager
def serve(repo, backend=None, router=None, **overrides):
    tree = {"repository": str(repo), "latency.ewma_alpha": 0.0, **overrides}
    with TestClient(
        create_app(load_settings(overrides=tree, environ={}), backend=backend, router_predictor=router)
    ) as client:
        yield client


def classify(client, imgs, **headers):
    h = {k.replace("_", "-"): str(v) for k, v in headers.items()}
    r = client.post("/v1/classify", json={"instances": [b64_instance(i) for i in imgs]}, headers=h)
    assert r.status_code == 200, r.text
    return r


def entry_only(repo, imgs):
    """What the entry pass alone answers (two-stage switched off; single-stage balanced picks int8 here)."""
    with serve(repo, **{"planner.enabled": False}) as client:
        return classify(client, imgs).json()["predictions"]


def test_a_follow_up_predicted_to_pay_runs_and_the_answer_averages_both_passes(repo):
    imgs = images(3, seed=5)
    with serve(repo, router=FakePlanRouter(int8__hflip=0.9)) as client:
        r = classify(client, imgs)
        body = r.json()
        assert [p["passes"] for p in body["predictions"]] == [["int8", "int8:hflip"]] * 3
        assert all(p["precision"] == "int8" for p in body["predictions"]) and r.headers["X-Precision"] == "int8"
        assert body["followups"] == 3 and body["followups_lost"] == 0
        assert metric(client, "aq_followups_total", plan="int8:hflip") == 3
        status = client.get("/v1/status").json()["router"]
        assert status["two_stage"] and status["followups_by_plan"]["int8:hflip"] == 3
    # the averaged answer differs from the entry's alone (the flipped view sees other pixels)
    alone = entry_only(repo, imgs)
    assert [p["confidence"] for p in body["predictions"]] != [p["confidence"] for p in alone]


def test_no_follow_up_where_none_is_predicted_to_pay(repo):
    imgs = images(2, seed=6)
    with serve(repo, router=FakePlanRouter(none=0.95, int8__hflip=0.951)) as client:  # +0.1 point for 1 pass
        body = classify(client, imgs).json()
    assert [p["passes"] for p in body["predictions"]] == [["int8"], ["int8"]] and body["followups"] == 0
    assert body["predictions"] == [dict(p, passes=["int8"]) for p in entry_only(repo, imgs)]


def test_a_follow_up_cut_at_the_deadline_leaves_the_entry_answer_within_budget(repo):
    imgs = images(2, seed=7)
    backend = FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))
    backend.delay_s["fp32"] = (
        3.0  # the profile says 240 ms at batch 2-8: on an idle server the planner thinks it fits 600 ms
    )
    with serve(repo, backend=backend, router=FakePlanRouter(fp32=0.99)) as client:
        r = classify(client, imgs, X_Priority="quality", X_Latency_Budget_Ms=600)
        body = r.json()
        assert "fp32" in backend.calls[-1:]  # the follow-up was sent...
        assert [p["passes"] for p in body["predictions"]] == [["int8"], ["int8"]]  # ...and cut
        assert body["followups"] == 0 and body["followups_lost"] == 2
        assert body["server_time_ms"] < 1000 and r.headers["X-Budget-Met"] == "true"
        assert metric(client, "aq_followup_passes_lost_total", reason="cut") == 2
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in entry_only(repo, imgs)]


def test_a_failing_follow_up_variant_falls_back_to_the_entry_answer(repo):
    imgs = images(2, seed=8)
    backend = FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))
    backend.fail.add("fp32")
    with serve(repo, backend=backend, router=FakePlanRouter(fp32=0.99)) as client:
        body = classify(client, imgs, X_Priority="quality").json()
        assert [p["passes"] for p in body["predictions"]] == [["int8"], ["int8"]]
        assert metric(client, "aq_followup_passes_lost_total", reason="failed") == 2
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in entry_only(repo, imgs)]


def test_the_floor_holds_for_the_entry_pass_and_every_follow_up(repo):
    imgs = images(2, seed=9)
    # int8:hflip is predicted best, but X-Min-Precision fp32 forbids int8 anywhere
    with serve(repo, router=FakePlanRouter(int8__hflip=0.99, fp32__hflip=0.9)) as client:
        body = classify(client, imgs, X_Min_Precision="fp32").json()
    assert [p["passes"] for p in body["predictions"]] == [["fp32", "fp32:hflip"]] * 2
    assert all(p["precision"] == "fp32" for p in body["predictions"])


def test_a_budget_too_tight_for_a_follow_up_plans_none(repo):
    imgs = images(2, seed=10)
    # int8 entry estimate 30 ms; fp32 80 ms cannot fit in the 60 ms left: no follow-up is even sent
    backend = FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))
    with serve(repo, backend=backend, router=FakePlanRouter(fp32=0.99)) as client:
        backend.calls.clear()
        body = classify(client, imgs, X_Priority="quality", X_Latency_Budget_Ms=90).json()
    assert backend.calls == ["int8"] and body["followups"] == 0 and body["followups_lost"] == 0


def test_a_router_fitted_by_the_exporter_is_served_from_the_manifest(tmp_path):
    repo = build_repo(tmp_path / "repo")
    val = make_synthetic(300, seed=3)
    fit = fit_router(repo, val, ["int8:hflip", "fp32"], threads=1)
    man = load_manifest(repo)
    assert [p.name for p in man.plans] == ["int8:hflip", "fp32"] and man.router["entry"] == "int8"
    assert fit.outcomes.shape == (300, 3) and all(p.extra_ms for p in man.plans)
    with serve(repo) as client:
        full = client.get("/v1/status").json()
        status = full["router"]
        assert status["two_stage"] and status["plans"] == ["int8:hflip", "fp32"]
        assert "two-stage after int8" in status["summary"] and "{" not in status["summary"]
        assert not full["single_stage"]["in_use"]  # the router decides; the priors are not used
        body = classify(client, images(4, seed=11)).json()
    assert all(p["passes"][0] == "int8" for p in body["predictions"])
    # a damaged router file: the gateway serves single-stage and says why
    (repo / man.router["path"]).write_bytes(b"not the weights")
    with serve(repo) as client:
        full = client.get("/v1/status").json()
        status = full["router"]
        assert not status["two_stage"] and "sha256" in status["summary"]
        assert full["single_stage"]["in_use"]
        assert classify(client, images(1)).json()["predictions"][0]["passes"] == ["int8"]


def test_quality_breaks_a_near_tie_by_the_plans_validation_accuracy(tmp_path):
    """The router sees 0.2 points between the plans of a confident sample, less than it resolves
    (planner.quality_tie): quality then runs the plan that was more accurate on validation, as the
    manifest records it; balanced does not pay a pass for 0.2 points."""
    repo = build_repo(tmp_path / "repo")
    manifest = load_manifest(repo)
    manifest.plans = [
        PlanEntry(name=name, passes=[name], entry="int8", val_accuracy=acc)
        for name, acc in (("int8:hflip", 0.8987), ("fp32", 0.8944), ("fp32:hflip", 0.9004))
    ]
    manifest.router = {"val_entry_accuracy": 0.8923}
    save_manifest(repo, manifest)
    router = FakePlanRouter(none=0.980, int8__hflip=0.978, fp32=0.979, fp32__hflip=0.977)
    imgs = images(2, seed=11)
    with serve(repo, router=router) as client:
        quality = classify(client, imgs, X_Priority="quality").json()
        balanced = classify(client, imgs).json()
    assert [p["passes"] for p in quality["predictions"]] == [["int8", "fp32:hflip"]] * 2
    assert [p["passes"] for p in balanced["predictions"]] == [["int8"]] * 2
    with serve(repo, router=router, **{"planner.quality_tie": 0.0}) as client:  # the rule off: the prediction alone
        off = classify(client, imgs, X_Priority="quality").json()
    assert [p["passes"] for p in off["predictions"]] == [["int8"]] * 2


def test_the_python_flavour_for_local_triton_carries_the_router(tmp_path):
    """aq-triton-local serves a Python-backend copy of the repository; a gateway given that copy
    must still find the two-stage router the copied manifest names (it was left behind before)."""
    from pathlib import Path

    from adaptive_quant.export.triton_python import write_python_flavor
    from adaptive_quant.serving.followup import load_router

    shipped = Path(__file__).resolve().parents[1] / "model_repository"
    flavour = write_python_flavor(shipped, tmp_path / "python_repo")
    manifest = load_manifest(flavour)
    found = load_router(flavour, manifest)
    assert found.predictor is not None, found.summary
    assert found.predictor.plan_names == load_router(shipped, load_manifest(shipped)).predictor.plan_names
