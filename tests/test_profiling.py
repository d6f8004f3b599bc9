"""Latency profiles on the host that serves: when the gateway re-profiles at start-up, what it
measures, and what /v1/status says about the profile in use."""

from __future__ import annotations

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from adaptive_quant.core.host import cpu_model, describe_host, host_differences
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.profiling import should_profile
from adaptive_quant.serving.settings import load_settings
from gateway_repo import P95_MS_BATCH1, build_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def test_host_differences_name_what_changed():
    here = describe_host(ort.__version__, 2)
    assert host_differences(here, here) == []
    other = {**here, "cpu": "AMD EPYC 9R14"}
    assert host_differences(other, here) == [f"cpu: AMD EPYC 9R14 → {here['cpu']}"]
    assert host_differences(None, here) == ["the profile names no host"]


def test_auto_profiles_only_when_the_manifest_comes_from_elsewhere(repo):
    manifest = load_manifest(repo)
    keys = ["fp32", "fp16", "int8"]
    here = describe_host(ort.__version__, 1)
    assert should_profile(manifest, keys, here, "auto") == (
        False,
        "the manifest's profiles were measured on this kind of host",
    )
    moved = {**here, "cpu": "some other CPU"}
    do, why = should_profile(manifest, keys, moved, "auto")
    assert do and "cpu:" in why and "some other CPU" in why
    assert should_profile(manifest, keys, here, "always")[0]
    assert not should_profile(manifest, keys, moved, "never")[0]


def status_with(repo, **overrides):
    settings = load_settings(overrides={"repository": str(repo), **overrides}, environ={})
    with TestClient(create_app(settings)) as client:
        status = client.get("/v1/status").json()
        ok = client.post("/v1/classify", json={"instances": [{"pixels": [[[1, 2, 3]] * 32] * 32}]})
        return status, ok


def test_start_up_profiling_replaces_the_manifest_profile_and_status_says_so(repo):
    status, ok = status_with(repo, **{"profiling.mode": "always", "profiling.budget_s": 0.3})
    assert ok.status_code == 200  # and it serves as before
    prof = status["profile"]
    assert prof["source"] == "measured at start-up" and prof["reason"] == "profiling.mode is always"
    assert prof["host"]["cpu"] == cpu_model() and prof["seconds"] > 0
    for key in ("fp32", "fp16", "int8"):
        p95 = prof["batch1_p95_ms"][key]
        assert p95["manifest"] == P95_MS_BATCH1[key]
        # the fixture's tiny models answer in well under a millisecond, not the manifest's 30-90 ms
        assert 0 < p95["used"] < p95["manifest"] / 10
        variant = next(v for v in status["variants"] if v["key"] == key)
        assert variant["latency"]["profile_p95_ms_batch1"] == pytest.approx(p95["used"], abs=1e-3)


def test_never_keeps_the_manifest_profile(repo):
    status, _ = status_with(repo, **{"profiling.mode": "never"})
    assert status["profile"]["source"] == "manifest" and "never" in status["profile"]["reason"]
    int8 = next(v for v in status["variants"] if v["key"] == "int8")
    assert int8["latency"]["profile_p95_ms_batch1"] == P95_MS_BATCH1["int8"]
