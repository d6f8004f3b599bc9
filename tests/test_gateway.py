"""The gateway as a caller sees it: through TestClient and over real HTTP, on a tiny model repository."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from adaptive_quant.core.manifest import load_manifest, save_manifest, sha256_file
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.settings import SettingsError, load_settings
from fake_backends import FakeFlakyBackend
from gateway_repo import b64_instance, build_repo, images, pixels_instance
from http_server import serve_in_thread  # tests/http_server.py
from prometheus_scrape import metric

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def make_settings(repo, **overrides):
    # ewma_alpha 0: routing follows the manifest's profiles exactly (the test machine is busy
    # training; its jitter must not change which variant a table case picks)
    tree = {"repository": str(repo), "latency.ewma_alpha": 0.0, **overrides}
    return load_settings(overrides=tree, environ={})


@contextmanager
def serve(repo, backend=None, **overrides):
    settings = make_settings(repo, **overrides)
    with TestClient(create_app(settings, backend=backend)) as client:
        yield client


def classify(client, instances, **headers):
    h = {k.replace("_", "-"): str(v) for k, v in headers.items()}
    return client.post("/v1/classify", json={"instances": instances}, headers=h)


def flaky(repo) -> FakeFlakyBackend:
    return FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))


# ----------------------------------------------------------------------------- classify


def test_b64_and_pixels_give_the_same_answer_with_headers_and_timing(repo):
    img = images(1, seed=1)[0]
    with serve(repo) as client:
        r = classify(client, [b64_instance(img), pixels_instance(img)])
    assert r.status_code == 200, r.text
    body = r.json()
    a, b = body["predictions"]
    assert a == b  # same image, same variant (no budget, balanced), same answer
    assert a["label"] in load_manifest(repo).classes and 0.1 <= a["confidence"] <= 1.0
    assert r.headers["X-Precision"] == a["precision"] == body["precision"]
    assert r.headers["X-Budget-Met"] == "true"  # no budget is always met
    assert 0 < float(r.headers["X-Server-Time-Ms"]) < 5_000
    assert body["fallbacks"] == 0 and body["budget_ms"] is None


@pytest.mark.parametrize(
    "headers, precision, met",
    [
        # profiles (p95 ms, batch 1): fp32 80, fp16 90, int8 30; accuracies .92/.919/.91
        ({}, "int8", "true"),  # balanced: 2.7× faster for 1 point
        ({"X-Priority": "quality"}, "fp32", "true"),
        ({"X-Priority": "speed"}, "int8", "true"),
        ({"X-Priority": "quality", "X-Latency-Budget-Ms": "500"}, "fp32", "true"),
        ({"X-Priority": "quality", "X-Latency-Budget-Ms": "85"}, "fp32", "true"),
        ({"X-Priority": "quality", "X-Latency-Budget-Ms": "50"}, "int8", "true"),
        ({"X-Priority": "QUALITY", "X-Latency-Budget-Ms": "10"}, "int8", "false"),  # nothing fits
        ({"X-Min-Precision": "fp16", "X-Priority": "speed"}, "fp32", "true"),  # fp32 is faster than fp16 here
        ({"X-Min-Precision": "fp16", "X-Latency-Budget-Ms": "50"}, "fp32", "false"),  # floor beats budget
        ({"X-Min-Precision": "fp32"}, "fp32", "true"),
        ({"X-Min-Precision": "int8", "X-Priority": "quality"}, "fp32", "true"),
    ],
)
def test_routing_table_through_the_api(repo, headers, precision, met):
    with serve(repo) as client:
        r = client.post("/v1/classify", json={"instances": [b64_instance(images(1)[0])]}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["X-Precision"] == precision
    assert r.headers["X-Budget-Met"] == met
    assert r.json()["predictions"][0]["precision"] == precision


def test_single_stage_sends_a_requests_samples_to_one_variant_in_one_call(repo):
    # no router: every sample gets each variant's validation accuracy, so they all route alike
    imgs = images(3, seed=2)
    backend = flaky(repo)
    with serve(repo, backend=backend) as client:
        backend.calls.clear()  # forget the start-up warm-up calls
        r = classify(
            client, [b64_instance(imgs[0]), b64_instance(imgs[1]), pixels_instance(imgs[2])], X_Priority="quality"
        )
        assert r.status_code == 200, r.text
        assert [p["precision"] for p in r.json()["predictions"]] == ["fp32", "fp32", "fp32"]
        assert r.headers["X-Precision"] == "fp32"
        assert backend.calls == ["fp32"]  # one backend call carries the three samples
        assert backend.batch_stats()["fp32"]["largest_batch"] == 3
        assert metric(client, "aq_samples_routed_total", variant="fp32") == 3
        status = client.get("/v1/status").json()
        assert status["single_stage"]["in_use"] and status["single_stage"]["source"] == "manifest"
        assert status["routing"]["samples_by_variant"] == {"fp32": 3, "fp16": 0, "int8": 0}


def test_a_failing_variant_falls_back_and_is_then_left_out(repo):
    backend = flaky(repo)
    backend.fail = {"fp32"}
    with serve(repo, backend=backend, **{"breaker.failures": 2, "breaker.cooldown_s": 60}) as client:
        img = b64_instance(images(1)[0])
        for _ in range(2):
            r = classify(client, [img], X_Priority="quality")
            assert r.status_code == 200, r.text
            assert r.headers["X-Precision"] == "fp16"  # the next most accurate variant answered
            assert r.json()["fallbacks"] == 1
        assert metric(client, "aq_fallbacks_total", variant="fp32", reason="error") == 2
        status = {v["key"]: v for v in client.get("/v1/status").json()["variants"]}
        assert status["fp32"]["failures"] == 2 and not status["fp32"]["routable"] and status["fp32"]["healthy"]
        backend.calls.clear()
        r = classify(client, [img], X_Priority="quality")
        assert r.status_code == 200 and r.json()["fallbacks"] == 0  # breaker open: no time lost on fp32
        assert backend.calls == ["fp16"]


def test_when_no_variant_can_answer_the_reply_is_503_with_retry_after_and_service_recovers(repo):
    backend = flaky(repo)
    backend.fail = {"fp32", "fp16", "int8"}
    with serve(repo, backend=backend, **{"breaker.cooldown_s": 0}) as client:
        backend.calls.clear()  # forget the start-up warm-up calls
        img = b64_instance(images(1)[0])
        r = classify(client, [img])
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert "no variant could answer" in r.json()["error"]["message"]
        assert metric(client, "aq_fallbacks_total", variant="int8", reason="error") == 1
        assert metric(client, "aq_requests_total", outcome="unavailable") == 1
        r = classify(client, [img], X_Min_Precision="fp32")
        assert r.status_code == 503 and sorted(backend.calls) == ["fp16", "fp32", "fp32", "int8"]
        backend.fail = set()
        assert classify(client, [img]).status_code == 200  # the outage is over: serving again


def test_deadline_cuts_a_slow_variant_and_the_estimate_learns(repo):
    backend = flaky(repo)
    backend.delay_s = {"fp32": 3.0}  # fp32 hangs; the profile says 80 ms
    settings = {"latency.ewma_alpha": 1.0, "deadline.grace_ms": 5.0}
    with serve(repo, backend=backend, **settings) as client:
        img = b64_instance(images(1)[0])
        t = time.perf_counter()
        r = classify(client, [img], X_Priority="quality", X_Latency_Budget_Ms=150)
        wall_s = time.perf_counter() - t
        assert r.status_code == 200, r.text
        assert wall_s < 1.5  # the gateway did not wait the 3 s for fp32
        assert r.headers["X-Precision"] != "fp32" and r.headers["X-Budget-Met"] == "false"
        assert float(r.headers["X-Server-Time-Ms"]) >= 150
        assert metric(client, "aq_fallbacks_total", variant="fp32", reason="timeout") == 1
        # fp32 now looks ≥155 ms slow: the next request routes around it and meets its budget
        backend.calls.clear()
        r = classify(client, [img], X_Priority="quality", X_Latency_Budget_Ms=150)
        assert r.status_code == 200 and backend.calls == ["fp16"]
        assert r.headers["X-Budget-Met"] == "true"


def test_a_last_resort_is_not_cut_by_the_budget_a_late_answer_beats_a_503(repo):
    backend = flaky(repo)
    backend.delay_s = {"fp32": 0.4}  # e.g. overloaded: slower than the budget, but it answers
    with serve(repo, backend=backend) as client:
        img = b64_instance(images(1)[0])
        t = time.perf_counter()
        r = classify(client, [img], X_Min_Precision="fp32", X_Latency_Budget_Ms=50)
        assert r.status_code == 200, r.text  # nothing else may answer: waited for fp32
        assert time.perf_counter() - t >= 0.4 and r.headers["X-Budget-Met"] == "false"
        assert r.json()["fallbacks"] == 0


def test_a_variant_merely_slower_than_the_budget_is_waited_for_not_cut(repo):
    backend = flaky(repo)
    backend.delay_s = {"fp32": 0.13}  # past the 100 ms budget, within 2 × its 80 ms estimate
    with serve(repo, backend=backend) as client:
        r = classify(client, [b64_instance(images(1)[0])], X_Priority="quality", X_Latency_Budget_Ms=100)
        assert r.status_code == 200 and r.headers["X-Precision"] == "fp32"  # answered by the variant chosen
        assert r.json()["fallbacks"] == 0 and r.headers["X-Budget-Met"] == "false"


def test_timeouts_reroute_but_do_not_open_the_breaker(repo):
    backend = flaky(repo)
    backend.delay_s = {"fp32": 0.5}  # busy, not broken; ewma_alpha 0 keeps routing to it
    with serve(repo, backend=backend, **{"breaker.failures": 2}) as client:
        img = b64_instance(images(1)[0])
        for _ in range(3):
            r = classify(client, [img], X_Priority="quality", X_Latency_Budget_Ms=150)
            assert r.status_code == 200 and r.json()["fallbacks"] == 1 and r.headers["X-Precision"] != "fp32"
        fp32 = next(v for v in client.get("/v1/status").json()["variants"] if v["key"] == "fp32")
        assert fp32["routable"] and fp32["failures"] == 0  # an error would count; a timeout does not
        assert metric(client, "aq_fallbacks_total", variant="fp32", reason="timeout") == 3


# ----------------------------------------------------------------------------- bad input


def _png(size=(32, 32), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


GOOD = images(1, seed=9)[0]
PIX = GOOD.tolist()

BAD_BODIES = [
    ("malformed JSON", b'{"instances": [', 400, "not valid JSON"),
    ("empty body", b"", 400, "empty"),
    ("not an object", b"[1, 2]", 422, "'instances'"),
    ("unknown field", json.dumps({"instances": [], "extra": 1}).encode(), 422, "unknown field"),
    ("instances not a list", json.dumps({"instances": "cat.png"}).encode(), 422, "must be a list"),
    ("empty instances", json.dumps({"instances": []}).encode(), 422, "empty"),
    (
        "neither b64 nor pixels",
        json.dumps({"instances": [{"url": "http://x/cat.png"}]}).encode(),
        422,
        "neither 'b64' nor 'pixels'",
    ),
    ("both b64 and pixels", json.dumps({"instances": [{"b64": _png(), "pixels": PIX}]}).encode(), 422, "exactly one"),
    ("instance not an object", json.dumps({"instances": [3]}).encode(), 422, "not an object"),
    ("not base64", json.dumps({"instances": [{"b64": "%%%not-base64%%%"}]}).encode(), 422, "not valid base64"),
    (
        "base64 of junk",
        json.dumps({"instances": [{"b64": base64.b64encode(b"hello world").decode()}]}).encode(),
        422,
        "does not decode",
    ),
    ("GIF image", json.dumps({"instances": [{"b64": _png(fmt="GIF")}]}).encode(), 422, "GIF is not accepted"),
    (
        "wrong image size",
        json.dumps({"instances": [{"b64": _png((64, 48))}]}).encode(),
        422,
        "64×48 pixels, expected 32×32",
    ),
    (
        "pixels wrong shape",
        json.dumps({"instances": [{"pixels": GOOD[:, :, 0].tolist()}]}).encode(),
        422,
        "shape 32×32;",
    ),
    ("pixels ragged", json.dumps({"instances": [{"pixels": [[1, 2, 3], [4, 5]]}]}).encode(), 422, "ragged"),
    ("pixels floats", json.dumps({"instances": [{"pixels": (GOOD / 255.0).tolist()}]}).encode(), 422, "non-integer"),
    (
        "pixels NaN",
        json.dumps({"instances": [{"pixels": np.where(GOOD > 100, np.nan, GOOD).tolist()}]}).encode(),
        422,
        "NaN",
    ),
    (
        "pixels out of range",
        json.dumps({"instances": [{"pixels": (GOOD.astype(int) + 100).tolist()}]}).encode(),
        422,
        "0..255",
    ),
    ("pixels strings", json.dumps({"instances": [{"pixels": [[["a"] * 3] * 32] * 32}]}).encode(), 422, "non-numeric"),
    ("pixels null", json.dumps({"instances": [{"pixels": None}]}).encode(), 422, "must be a 32×32×3"),
    ("too many instances", json.dumps({"instances": [{"b64": _png()}] * 9}).encode(), 413, "at most 8"),
    (
        "oversized body",
        json.dumps({"instances": [{"pixels": PIX}] * 5, "pad": "x" * 150_000}).encode(),
        413,
        "at most 150000",
    ),
]

BAD_HEADERS = [
    ({"X-Latency-Budget-Ms": "-5"}, "X-Latency-Budget-Ms must be a positive number"),
    ({"X-Latency-Budget-Ms": "0"}, "X-Latency-Budget-Ms must be a positive number"),
    ({"X-Latency-Budget-Ms": "ten"}, "X-Latency-Budget-Ms must be a positive number"),
    ({"X-Latency-Budget-Ms": "nan"}, "X-Latency-Budget-Ms must be a positive number"),
    ({"X-Priority": "fastest"}, "accepted: quality, balanced, speed"),
    ({"X-Min-Precision": "int4"}, "accepted: fp32, fp16, int8"),
]


@pytest.fixture(scope="module")
def limited_client(repo):
    with serve(repo, **{"limits.max_instances": 8, "limits.max_request_bytes": 150_000}) as client:
        yield client


@pytest.mark.parametrize("name, body, status, message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_a_4xx_that_says_what_is_wrong(limited_client, name, body, status, message):
    r = limited_client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"]
    if status == 422 and "instance" in err["message"]:
        assert any(w in err["message"] for w in ("accepted", "expected", "must be"))  # says what is accepted


@pytest.mark.parametrize("headers, message", BAD_HEADERS, ids=[str(h) for h, _ in BAD_HEADERS])
def test_bad_headers_get_a_422_naming_what_is_accepted(limited_client, headers, message):
    r = limited_client.post("/v1/classify", json={"instances": [b64_instance(GOOD)]}, headers=headers)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]


def test_after_all_the_bad_input_the_service_still_serves(limited_client):
    # runs after the parametrised cases above (pytest keeps file order)
    errors = metric(limited_client, "aq_requests_total", outcome="client_error")
    assert errors == len(BAD_BODIES) + len(BAD_HEADERS)
    assert metric(limited_client, "aq_requests_total", outcome="error") == 0  # never a 500
    r = classify(limited_client, [b64_instance(GOOD)] * 8)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 8
    # integral floats (json.dumps of a float array; 255.0 is an integer to JSON Schema) are pixels too
    r = classify(limited_client, [{"pixels": GOOD.astype(float).tolist()}, b64_instance(GOOD)])
    assert r.status_code == 200 and r.json()["predictions"][0] == r.json()["predictions"][1]
    assert limited_client.get("/healthz").json() == {"status": "alive"}


def test_unknown_paths_and_methods_get_json_errors(limited_client):
    assert limited_client.get("/v1/nothing").json()["error"]["type"] == "not_found"
    assert limited_client.get("/v1/classify").status_code == 405


# ----------------------------------------------------------------------------- health, status, metrics


def test_a_corrupt_variant_is_left_out_and_the_others_serve(tmp_path):
    repo = build_repo(tmp_path / "r")
    manifest = load_manifest(repo)
    path = repo / manifest.variants["fp16"].path
    path.write_bytes(b"this is not ONNX")
    manifest.variants["fp16"].sha256 = sha256_file(path)  # a consistent manifest: only ORT can tell
    save_manifest(repo, manifest)
    with serve(repo) as client:
        assert client.get("/readyz").status_code == 200
        variants = {v["key"]: v for v in client.get("/v1/status").json()["variants"]}
        assert not variants["fp16"]["healthy"] and "cannot load" in variants["fp16"]["detail"]
        assert variants["fp32"]["healthy"] and variants["int8"]["healthy"]
        models = {v["key"]: v for v in client.get("/v1/models").json()["variants"]}
        assert models["fp16"]["healthy"] is False and models["int8"]["healthy"] is True
        r = classify(client, [b64_instance(GOOD)], X_Min_Precision="fp16", X_Priority="speed")
        assert r.status_code == 200 and r.headers["X-Precision"] == "fp32"


def test_nothing_loadable_means_not_ready_and_503(tmp_path):
    repo = build_repo(tmp_path / "r")
    for v in load_manifest(repo).variants.values():
        (repo / v.path).unlink()
    with serve(repo) as client:
        assert client.get("/healthz").status_code == 200  # alive...
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False  # ...but cannot serve
        r = classify(client, [b64_instance(GOOD)])
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert "missing" in client.get("/v1/status").json()["variants"][0]["detail"]


def test_a_floor_this_model_does_not_offer_is_the_callers_mistake(tmp_path):
    repo = build_repo(tmp_path / "r")
    manifest = load_manifest(repo)
    for key in ("fp32", "fp16"):
        manifest.variants[key].served = False
    save_manifest(repo, manifest)
    with serve(repo) as client:
        r = classify(client, [b64_instance(GOOD)], X_Min_Precision="fp16")
        assert r.status_code == 422 and "offers int8" in r.json()["error"]["message"]


def test_metrics_and_status_reflect_the_traffic(repo):
    with serve(repo) as client:
        img = b64_instance(GOOD)
        assert classify(client, [img, img], X_Latency_Budget_Ms=5000).headers["X-Budget-Met"] == "true"
        assert classify(client, [img], X_Latency_Budget_Ms=1).headers["X-Budget-Met"] == "false"
        assert classify(client, [img], X_Priority="quality").status_code == 200
        assert classify(client, [], X_Priority="quality").status_code == 422
        assert metric(client, "aq_requests_total", outcome="ok") == 3
        assert metric(client, "aq_requests_total", outcome="client_error") == 1
        assert metric(client, "aq_budget_total", result="met") == 1
        assert metric(client, "aq_budget_total", result="missed") == 1
        assert metric(client, "aq_samples_routed_total", variant="int8") == 3
        assert metric(client, "aq_samples_routed_total", variant="fp32") == 1
        assert metric(client, "aq_backend_latency_seconds_count", variant="int8") == 2
        assert metric(client, "aq_routing_decision_seconds_count") == 3
        assert metric(client, "aq_in_flight_requests") == 0
        status = client.get("/v1/status").json()
        assert status["ready"] and status["backend"] == "embedded" and status["model"] == "tiny"
        assert status["single_stage"]["in_use"]  # the manifest names no router
        assert status["routing"]["samples_by_variant"] == {"fp32": 1, "fp16": 0, "int8": 3}
        assert status["routing"]["requests"]["ok"] == 3
        assert status["routing"]["budget_met"] == 1 and status["routing"]["budget_missed"] == 1
        assert status["process"]["rss_bytes"] > 10_000_000
        lat = {v["key"]: v["latency"] for v in status["variants"]}
        assert lat["int8"]["profile_p95_ms_batch1"] == 30.0 and lat["int8"]["in_flight_samples"] == 0
        assert client.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["requestBody"]


def test_a_png_decodes_to_exactly_the_pixels_that_were_sent():
    # the same image as PNG (b64) and as pixels must reach the model as the same input
    from adaptive_quant.serving.decode import decode_instances

    imgs = images(5, seed=5)
    decoded = decode_instances({"instances": [b64_instance(im) for im in imgs]}, max_instances=64, size=32)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, imgs)


def test_settings_reject_unknown_keys_and_wrong_types_and_read_env():
    with pytest.raises(SettingsError, match="unknown setting 'server.prot'"):
        load_settings(overrides={"server.prot": 1}, environ={})
    with pytest.raises(SettingsError, match=r"setting 'server\.port': must be an integer, got 'eighty'"):
        load_settings(overrides={"server.port": "eighty"}, environ={})
    with pytest.raises(SettingsError, match=r"setting 'backend\.kind' \(from AQ_BACKEND__KIND\): must be one of"):
        load_settings(environ={"AQ_BACKEND__KIND": "tensorrt"})
    s = load_settings(
        ROOT / "configs" / "serve.yaml",
        overrides={"server.port": "9001"},
        environ={"AQ_BACKEND__KIND": "triton", "AQ_SERVER__PORT": "9000"},
    )
    assert (s.backend.kind, s.server.port, s.server.host) == ("triton", 9001, "127.0.0.1")


# ----------------------------------------------------------------------------- over real HTTP


@contextmanager
def http_server(settings):
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_over_real_http_with_concurrent_callers(repo):
    settings = make_settings(repo, **{"batching.max_queue_delay_us": 2000})
    with http_server(settings) as url:
        bodies = [{"instances": [b64_instance(im)]} for im in images(16, seed=5)]

        async def fire():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(
                    *(client.post("/v1/classify", json=b, headers={"X-Latency-Budget-Ms": "5000"}) for b in bodies)
                )

        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * 16
        assert all(r.headers["X-Budget-Met"] == "true" for r in responses)
        # 16 samples in flight make int8's queue estimate grow: load spreads over the variants,
        # yet every answer says which precision served it
        # the same image answered alone gets the same label as under concurrency
        alone = httpx.post(f"{url}/v1/classify", json=bodies[3], timeout=30).json()["predictions"][0]
        assert alone["label"] == responses[3].json()["predictions"][0]["label"]
        r = httpx.post(f"{url}/v1/classify", content=b"{nope", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        r = httpx.post(f"{url}/v1/classify", json=bodies[0], headers={"X-Priority": "slow"})
        assert r.status_code == 422
        status = httpx.get(f"{url}/v1/status").json()
        routed = status["routing"]["samples_by_variant"]
        served = [p["precision"] for r in responses for p in r.json()["predictions"]] + [alone["precision"]]
        assert routed == {k: served.count(k) for k in ("fp32", "fp16", "int8")}
        assert sum(v["batching"]["samples"] for v in status["variants"]) == 17 + 3  # + one warm-up per variant
        text = httpx.get(f"{url}/metrics").text
        assert 'aq_requests_total{outcome="ok"} 17.0' in text
        assert 'aq_requests_total{outcome="client_error"} 2.0' in text
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_serve_script_fails_clearly_without_a_repository(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "--repository", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "manifest.json does not exist" in r.stderr and "scripts/export.py" in r.stderr


def test_serving_code_imports_no_torch(repo):
    code = (
        "import sys; from fastapi.testclient import TestClient;"
        "from adaptive_quant.serving.app import create_app; from adaptive_quant.serving.settings import load_settings;"
        "import adaptive_quant.serving.backends.triton, adaptive_quant.core.routing, adaptive_quant.core.prior;"
        f"app = create_app(load_settings(overrides={{'repository': {str(repo)!r}}}, environ={{}}));"
        "c = TestClient(app).__enter__(); assert c.get('/readyz').status_code == 200;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchao', 'torchvision'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_predict_script_prints_a_table_in_process_and_against_a_running_service(repo, tmp_path):
    sample = tmp_path / "sample.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_sample.py"), "--synthetic", "--n", "3", "--out", str(sample)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(sample.read_text())["instances"]) == 3
    predict = [sys.executable, str(ROOT / "scripts" / "predict.py"), "--input", str(sample), "--latency-budget", "60"]
    r = subprocess.run(
        predict + ["--repository", str(repo), "--config", str(ROOT / "configs" / "serve.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["sample", "label", "confidence", "precision", "latency", "ms", "budget", "met"]
    assert len([ln for ln in lines if " int8 " in ln]) == 3  # 60 ms fits only int8 (30 ms profiled)
    assert "3/3 answered" in r.stdout and "budget met for 3/3" in r.stdout
    with http_server(make_settings(repo)) as url:
        r = subprocess.run(
            predict + ["--url", url, "--min-precision", "fp32"], capture_output=True, text=True, timeout=60
        )
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if " fp32 " in ln]) == 3 and url in r.stdout
    assert "budget met for 0/3" in r.stdout  # fp32 (80 ms profiled) cannot meet 60 ms, and says so


def test_pinning_the_gateway_to_one_variant(repo):
    with serve(repo, variants=["int8"]) as client:
        r = classify(client, [b64_instance(GOOD)], X_Priority="quality")
        assert r.status_code == 200 and r.headers["X-Precision"] == "int8"
        assert [v["key"] for v in client.get("/v1/status").json()["variants"]] == ["int8"]
        r = classify(client, [b64_instance(GOOD)], X_Min_Precision="fp32")
        assert r.status_code == 422  # this service, as configured, offers int8 only
    with pytest.raises(SettingsError, match="int4"):
        create_app(make_settings(repo, variants="int4,int8"))
