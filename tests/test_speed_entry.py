"""The cheap entry: a speed router fitted after a cheaper variant, and the gateway choosing the entry per request.

The repository is the torch-free tiny one (gateway_repo.build_repo, as test_two_stage fits its router
on), not the smoke export: it has no pruned variant, and the smoke export's INT8 is already its
cheapest. So the tests add one cheaply, as `aq-export --add-variant` does: an opt-in INT8 variant of
other weights, "int8_pruned25", whose latency profile is a fifth of INT8's. The mechanics under test
(versions, manifest, entry choice, fallback, follow-up stage, status) do not depend on its accuracy.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from adaptive_quant.cli import fit_router as fit_router_cli
from adaptive_quant.core.manifest import (
    LatencyPoint,
    LatencyProfile,
    VariantEntry,
    load_manifest,
    manifest_from_dict,
    save_manifest,
    sha256_file,
)
from adaptive_quant.core.planner import PlannerConfig
from adaptive_quant.core.routing import Priority
from adaptive_quant.core.versions import read_index
from adaptive_quant.serving import factory
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.followup import LoadedRouter, followup_priority
from adaptive_quant.serving.settings import load_settings
from fake_backends import FakeFlakyBackend
from gateway_repo import CONFIG_PBTXT, _weights, b64_instance, build_repo, images, make_int8
from prometheus_scrape import metric

CHEAP = "int8_pruned25"
CHEAP_SHARE = 0.2  # its profiled time / INT8's: budgets below leave it ≥ 20 ms of margin
SMOKE = ["--config", "configs/smoke.yaml", "--set", "data.synthetic_train=400"]


def add_cheap_variant(repo: Path) -> None:
    """An opt-in INT8 variant of other weights (a stand-in for the pruned network), profiled cheaper than INT8."""
    manifest = load_manifest(repo)
    name = "tiny_int8_pruned25"
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(make_int8(_weights(seed=1)), path)
    (repo / name / "config.pbtxt").write_text(CONFIG_PBTXT.format(name=name))
    int8 = manifest.variants["int8"]
    batches = {
        b: LatencyPoint(p.p50_ms * CHEAP_SHARE, p.p95_ms * CHEAP_SHARE, p.throughput / CHEAP_SHARE)
        for b, p in int8.latency.batches.items()
    }
    manifest.variants[CHEAP] = VariantEntry(
        key=CHEAP,
        precision="int8",
        triton_name=name,
        path=str(path.relative_to(repo)),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        opt_in=True,
        val_accuracy=0.895,
        latency=LatencyProfile(host=int8.latency.host, batches=batches),
    )
    save_manifest(repo, manifest)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, str]:
    """A repository with the main router (after int8) and then the speed router (after the cheap
    variant), both fitted by aq-fit-router; and what the speed fit printed. Copy it before changing it."""
    repo = build_repo(tmp_path_factory.mktemp("speed") / "repo")
    add_cheap_variant(repo)
    assert fit_router_cli.main(["--repository", str(repo), *SMOKE, "--set", "export.plans=[int8:hflip]"]) == 0
    main_version = read_index(repo).serving
    assert fit_router_cli.main(["--repository", str(repo), *SMOKE, "--speed-entry", CHEAP]) == 0
    assert read_index(repo).serving == main_version + 1
    return repo, main_version


@contextmanager
def serve(repo, backend=None, **overrides):
    tree = {"repository": str(repo), "latency.ewma_alpha": 0.0, **overrides}
    with TestClient(create_app(load_settings(overrides=tree, environ={}), backend=backend)) as client:
        yield client


def classify(client, n: int, seed: int, **headers) -> dict:
    h = {k.replace("_", "-"): str(v) for k, v in headers.items()}
    r = client.post("/v1/classify", json={"instances": [b64_instance(i) for i in images(n, seed)]}, headers=h)
    assert r.status_code == 200, r.text
    return r.json()


def first_passes(body: dict) -> list[str]:
    return [p["passes"][0] for p in body["predictions"]]


def test_aq_fit_router_speed_entry_publishes_a_version_with_both_routers(fitted, capsys):
    repo, main_version = fitted
    manifest = load_manifest(repo)
    before = json.loads((repo / "manifests" / f"{main_version}.json").read_text())
    speed = manifest.speed_router
    assert speed["entry"] == CHEAP and speed["plans"] == ["none", "int8", "int8+int8:hflip"]  # export.speed_plans
    assert speed["path"].startswith(f"router/{manifest.version}/speed/") and (repo / speed["path"]).is_file()
    # the main router and its plans are the previous version's, as they were
    assert manifest.router["entry"] == "int8" and manifest.router["sha256"] == before["router"]["sha256"]
    assert (repo / manifest.router["path"]).is_file()
    assert sorted((p.entry, p.name) for p in manifest.plans) == [
        ("int8", "int8:hflip"),
        (CHEAP, "int8"),
        (CHEAP, "int8+int8:hflip"),
    ]
    assert manifest.plan_accuracies(["none", "int8:hflip"]) is not None  # the main router's, by default
    assert manifest.plan_accuracies(speed["plans"], entry=CHEAP) is not None
    assert CHEAP in [v.key for v in manifest.routed_variants()]  # opt-in, taken in by the speed router
    # refitting the main router keeps the speed router and its plans (another new version)
    capsys.readouterr()
    work = repo.parent / "refit"
    shutil.copytree(repo, work)
    assert fit_router_cli.main(["--repository", str(work), *SMOKE, "--set", "export.plans=[fp32]"]) == 0
    refit = load_manifest(work)
    assert refit.speed_router["sha256"] == speed["sha256"] and (work / refit.speed_router["path"]).is_file()
    assert sorted((p.entry, p.name) for p in refit.plans) == [
        ("int8", "fp32"),
        (CHEAP, "int8"),
        (CHEAP, "int8+int8:hflip"),
    ]
    # the cheap entry must be another variant than the main router's
    assert fit_router_cli.main(["--repository", str(work), *SMOKE, "--speed-entry", "int8"]) == 2
    assert "another variant than the main router's" in capsys.readouterr().err


def test_a_manifest_without_a_speed_router_still_reads(tmp_path):
    repo = build_repo(tmp_path / "repo")
    add_cheap_variant(repo)
    data = json.loads((repo / "manifest.json").read_text())
    data.pop("speed_router")  # as every manifest written before the cheap entry
    old = manifest_from_dict(data)
    assert old.speed_router is None and old.speed_entry() is None
    assert CHEAP not in [v.key for v in old.routed_variants()]  # opt-in stays out without a speed router


def test_speed_requests_enter_on_the_cheap_entry_and_balanced_ones_on_int8(fitted):
    repo, _ = fitted
    with serve(repo) as client:
        speed = classify(client, 4, seed=1, X_Priority="speed")
        balanced = classify(client, 4, seed=1)
        roomy = classify(client, 1, seed=2, X_Latency_Budget_Ms=500)
        # int8's estimate (30 ms) does not fit 29 ms, the cheap entry's (6 ms) does: balanced enters cheap
        tight = classify(client, 1, seed=3, X_Latency_Budget_Ms=29)
        status = client.get("/v1/status").json()
        entered = metric(client, "aq_samples_routed_total", variant=CHEAP)
        escalated = sum(
            metric(client, "aq_entry_followups_total", entry=CHEAP, plan=p) for p in ("int8", "int8+int8:hflip")
        )
    assert first_passes(speed) == [CHEAP] * 4 and first_passes(balanced) == ["int8"] * 4
    assert first_passes(roomy) == ["int8"] and first_passes(tight) == [CHEAP]
    # follow-ups after the cheap entry are the speed router's plans, never the main router's
    for body in (speed, tight):
        for p in body["predictions"]:
            assert p["passes"][1:] in ([], ["int8"], ["int8", "int8:hflip"])
    sr = status["speed_router"]
    assert sr["in_use"] and sr["entry"] == CHEAP and sr["plans"] == ["int8", "int8+int8:hflip"]
    assert sr["followup_priority_at_least"] == "balanced"
    assert sr["samples_entered"] == entered == 5
    upgraded = speed["followups"] + tight["followups"]
    assert sr["escalated"] == escalated == upgraded  # no budget cut them: every planned follow-up answered
    assert status["router"]["two_stage"] and status["router"]["plans"] == ["int8:hflip"]


def test_a_failing_cheap_entry_falls_back_to_the_normal_entry(fitted):
    repo, _ = fitted
    backend = FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))
    backend.fail.add(CHEAP)  # injected failure: every call on the cheap variant raises
    with serve(repo, backend=backend) as client:
        body = classify(client, 3, seed=4, X_Priority="speed")
        assert metric(client, "aq_fallbacks_total", variant=CHEAP, reason="error") == 1
    assert first_passes(body) == ["int8"] * 3 and body["fallbacks"] == 1
    # after int8 the main router plans: its only plan is int8:hflip
    assert all(p["passes"][1:] in ([], ["int8:hflip"]) for p in body["predictions"])


def test_a_damaged_speed_router_serves_with_the_normal_entry_and_says_why(fitted, tmp_path):
    repo, _ = fitted
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    manifest = load_manifest(copy)
    weights = copy / manifest.speed_router["path"]
    weights.unlink()  # a hard link in a versioned repository: replaced, never written through
    weights.write_bytes(b"not the weights")
    with serve(copy) as client:
        body = classify(client, 2, seed=5, X_Priority="speed")
        status = client.get("/v1/status").json()
    assert first_passes(body) == ["int8"] * 2
    sr = status["speed_router"]
    assert not sr["in_use"] and sr["entry"] == CHEAP and "sha256" in sr["summary"]
    assert status["router"]["two_stage"]  # the main router is not affected


def test_the_cheap_entry_is_not_taken_below_the_floor_or_when_a_variant_is_pinned(fitted):
    repo, _ = fitted
    with serve(repo) as client:
        floor = classify(client, 2, seed=6, X_Priority="speed", X_Min_Precision="fp16")
        assert all(p != CHEAP for p in first_passes(floor))
    with serve(repo, variants=["int8", "fp32"]) as client:  # pinned without it: no cheap entry
        pinned = classify(client, 2, seed=6, X_Priority="speed")
        assert not client.get("/v1/status").json()["speed_router"]["in_use"]
    assert first_passes(pinned) == ["int8"] * 2


def test_follow_ups_after_the_cheap_entry_are_planned_at_least_balanced():
    config = PlannerConfig()
    cheap = PlannerConfig(followup_price=0.001, plan_tie=0.05, cheap_entry_price=0.02, slack=3.0).for_cheap_entry()
    # its own price, no validation ties (they spend compute the cheap entry is there to save), the rest kept
    assert (cheap.followup_price, cheap.plan_tie, cheap.slack) == (0.02, 0.0, 3.0)
    assert followup_priority(Priority.SPEED, True, config) is Priority.BALANCED
    assert followup_priority(Priority.SPEED, False, config) is Priority.SPEED
    assert followup_priority(Priority.QUALITY, True, config) is Priority.QUALITY
    off = PlannerConfig(cheap_entry_priority=Priority.SPEED)
    assert followup_priority(Priority.SPEED, True, off) is Priority.SPEED
    settings = load_settings(overrides={"planner.cheap_entry_priority": "quality"}, environ={})
    assert settings.planner.cheap_entry_priority is Priority.QUALITY


class FakeSpeedRouter:
    """Test double for the speed router's predictor: every sample is predicted to gain 1.9 points from
    an INT8 pass after the cheap entry. That clears balanced's price for it here (cheap_entry_price
    0.003 × 5 entry passes = 1.5 points, and a little more for the load of this one request) but not
    speed's tolerance (2 points): the two priorities plan differently."""

    plan_names = ["none", "int8", "int8+int8:hflip"]

    def predict(self, entry_logits: np.ndarray) -> np.ndarray:
        return np.tile([0.5, 0.519, 0.5], (len(entry_logits), 1))


@pytest.mark.parametrize(
    "floor, price_key, escalated",
    [
        ("balanced", "planner.cheap_entry_price", True),
        ("speed", "planner.cheap_entry_price", False),
        # the main entry's price does not reach the cheap entry: at its own 0.01 (5 points here) no escalation
        ("balanced", "planner.followup_price", False),
    ],
)
def test_a_speed_request_entering_cheap_escalates_with_balanced_pricing(
    fitted, monkeypatch, floor, price_key, escalated
):
    repo, _ = fitted
    monkeypatch.setattr(factory, "speed_router", lambda settings, manifest: LoadedRouter(FakeSpeedRouter(), "fake", {}))
    overrides = {price_key: 0.003, "planner.cheap_entry_priority": floor}
    with serve(repo, **overrides) as client:
        body = classify(client, 1, seed=7, X_Priority="speed")
    assert body["predictions"][0]["passes"] == ([CHEAP, "int8"] if escalated else [CHEAP])


def test_a_serving_gateway_takes_the_cheap_entry_up_when_the_speed_router_is_published(tmp_path):
    """aq-fit-router --speed-entry publishes a version; a running gateway follows it without a restart."""
    repo = build_repo(tmp_path / "repo")
    add_cheap_variant(repo)
    assert fit_router_cli.main(["--repository", str(repo), *SMOKE, "--set", "export.plans=[int8:hflip]"]) == 0
    with serve(repo, **{"rollout.poll_s": 0.05}) as client:
        before = classify(client, 2, seed=8, X_Priority="speed")
        assert not client.get("/v1/status").json()["speed_router"]["in_use"]
        assert fit_router_cli.main(["--repository", str(repo), *SMOKE, "--speed-entry", CHEAP]) == 0
        published = read_index(repo).serving
        deadline = time.monotonic() + 60.0  # a bound on the wait only: nothing asserts how long it took
        while client.get("/v1/status").json()["version"] != published:
            assert time.monotonic() < deadline, f"the gateway never served version {published}"
            time.sleep(0.05)
        after = classify(client, 2, seed=8, X_Priority="speed")
        assert client.get("/v1/status").json()["speed_router"]["in_use"]
    assert first_passes(before) == ["int8"] * 2 and first_passes(after) == [CHEAP] * 2


class BusyEstimatorDouble:
    """Test double for the latency estimator of a busy server: a load of 10 full batches in flight,
    every variant 1 ms. At followup_price 0.003 a load-priced follow-up costs 0.003 × (1 + 10) =
    3.3 points per entry pass, more than FakeSpeedRouter's 1.9-point gain; unpriced it costs 0.3."""

    profile_version = 0

    def load(self) -> float:
        return 10.0

    def compute_ms(self, key: str, n: int) -> float:
        return 1.0

    def estimate_ms(self, key: str, n: int) -> float:
        return 1.0

    def estimates_ms(self, keys, n: int) -> list[float]:
        return [1.0] * len(keys)


@pytest.mark.parametrize("load_priced, escalated", [(True, False), (False, True)])
def test_the_cheap_entry_s_escalations_are_not_shed_by_the_load(load_priced, escalated):
    """planner.cheap_entry_load_priced false (the default): under load the cheap entry's uncertain
    samples still escalate, which is what keeps a speed answer at INT8's accuracy."""
    from adaptive_quant.core.precision import Precision
    from adaptive_quant.serving.followup import FollowupStage

    config = PlannerConfig(followup_price=0.003, load_price=1.0)
    assert PlannerConfig().cheap_entry_load_priced is False
    stage = FollowupStage(
        FakeSpeedRouter(), [CHEAP, "int8"], [Precision.INT8, Precision.INT8], config, load_priced=load_priced
    )
    allowed = stage.allowed(CHEAP, {CHEAP: True, "int8": True}, None)
    decision = stage.decide(CHEAP, np.zeros((2, 10)), allowed, None, Priority.BALANCED, BusyEstimatorDouble())
    assert [stage.plans[int(j)].name for j in decision.index] == (["int8"] * 2 if escalated else ["none"] * 2)
