"""The Open Inference Protocol (KServe v2) front, driven by Triton's own client (tritonclient.http)
over real HTTP: readiness, metadata, inference that matches /v1/classify, routing parameters,
pinned variants, and every kind of bad input getting a 4xx in the protocol's shape."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.stats import softmax
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from gateway_repo import MODEL, build_repo, images, pixels_instance
from http_server import serve_in_thread
from prometheus_scrape import metric
from test_two_stage import FakePlanRouter

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def _serve(repo, router=None, **overrides):
    settings = load_settings(overrides={"repository": str(repo), "latency.ewma_alpha": 0.0, **overrides}, environ={})
    return serve_in_thread(create_app(settings, router_predictor=router))


@pytest.fixture(scope="module")
def url(repo):
    """Single-stage (this repository ships no router): quality picks fp32 unless a budget forbids it."""
    with _serve(repo) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    c = triton_http.InferenceServerClient(url.removeprefix("http://"))
    yield c
    c.close()


def model_input(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    imgs = images(n, seed=seed)
    return imgs, to_model_input(imgs, CIFAR10_MEAN, CIFAR10_STD)


def tensor(x: np.ndarray, name: str = "images", datatype: str = "FP32", binary: bool = True):
    t = triton_http.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x, binary_data=binary)
    return t


def strings(result, name: str) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy(name).reshape(-1)]


def test_probes_and_metadata_answer_like_triton(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(f"{MODEL}_int8")
    meta = client.get_server_metadata()
    assert meta["name"] == "adaptive-quant" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in model["inputs"]
    assert [o["name"] for o in model["outputs"]] == ["logits", "passes", "precision"]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 64 and config["output"][0]["dims"] == [10]
    assert [o["data_type"] for o in config["output"]] == ["TYPE_FP32", "TYPE_STRING", "TYPE_STRING"]
    assert client.get_model_metadata(MODEL, model_version="1")["name"] == MODEL
    for call in (lambda: client.get_model_metadata("resnet50"), lambda: client.is_model_ready(MODEL, "7")):
        with pytest.raises(InferenceServerException) as err:
            if call() is False:  # is_model_ready answers False on any non-200
                raise InferenceServerException("not ready", status="404")
        assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="unknown model 'resnet50'; models: tiny, tiny_fp32"):
        client.get_model_config("resnet50")


def test_inference_matches_v1_classify_in_every_encoding(client, url):
    imgs, x = model_input(5, seed=1)
    r = httpx.post(f"{url}/v1/classify", json={"instances": [pixels_instance(i) for i in imgs]})
    v1 = r.json()["predictions"]
    binary = client.infer(MODEL, [tensor(x)])  # tritonclient's default: binary in, binary out
    as_json = client.infer(
        MODEL,
        [tensor(x, binary=False)],
        outputs=[triton_http.InferRequestedOutput(n, binary_data=False) for n in ("logits", "passes", "precision")],
    )
    pixels = client.infer(MODEL, [tensor(imgs, "pixels", "UINT8")])
    for result in (binary, as_json, pixels):
        probs = softmax(result.as_numpy("logits"))
        assert probs.argmax(1).tolist() == [p["class_id"] for p in v1]
        np.testing.assert_allclose(probs.max(1), [p["confidence"] for p in v1], atol=1e-5)
        assert strings(result, "passes") == [",".join(p["passes"]) for p in v1]
        assert strings(result, "precision") == [p["precision"] for p in v1]
        assert result.get_response()["parameters"]["precision"] == r.json()["precision"]
    # the classification extension: top-k as "score:index:label"
    top = client.infer(MODEL, [tensor(x)], outputs=[triton_http.InferRequestedOutput("logits", class_count=2)])
    first = strings(top, "logits")[0].split(":")
    assert top.as_numpy("logits").shape == (5, 2) and int(first[1]) == v1[0]["class_id"] and first[2] == v1[0]["label"]
    # compressed both ways, with a request id echoed back
    zipped = client.infer(
        MODEL,
        [tensor(x)],
        request_id="req-7",
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    assert zipped.get_response()["id"] == "req-7"
    np.testing.assert_array_equal(zipped.as_numpy("logits"), binary.as_numpy("logits"))


def test_routing_parameters_change_what_answers(client):
    _, x = model_input(1, seed=2)

    def precision(**params) -> tuple[str, dict]:
        result = client.infer(MODEL, [tensor(x)], parameters=params)
        return strings(result, "precision")[0], result.get_response()["parameters"]

    # profile: int8 30 ms, fp32 80 ms, fp16 90 ms at batch 1; quality takes the most accurate that fits
    assert precision(routing_priority="quality")[0] == "fp32"
    got, params = precision(routing_priority="quality", latency_budget_ms=50)
    assert got == "int8" and params["latency_budget_ms"] == 50 and params["budget_met"] is True
    assert precision(routing_priority="speed", min_precision="fp16")[0] in ("fp16", "fp32")
    # the REST front's headers work here too; a parameter wins over a header
    assert client.infer(MODEL, [tensor(x)], headers={"X-Priority": "quality"}).as_numpy("precision")[0] == b"fp32"
    result = client.infer(
        MODEL, [tensor(x)], headers={"X-Latency-Budget-Ms": "50"}, parameters={"routing_priority": "quality"}
    )
    assert strings(result, "precision") == ["int8"]
    result = client.infer(
        MODEL, [tensor(x)], headers={"X-Latency-Budget-Ms": "50"}, parameters={"latency_budget_ms": 500.0}
    )
    assert result.get_response()["parameters"]["latency_budget_ms"] == 500.0
    # Triton's integer scheduling priority is accepted and said to be ignored
    result = client.infer(MODEL, [tensor(x)], priority=2, timeout=100_000)
    assert result.get_response()["parameters"]["ignored_parameters"] == "priority,timeout"


def test_a_variant_by_its_triton_name_answers_alone(client):
    _, x = model_input(3, seed=3)
    for key in ("int8", "fp32"):
        result = client.infer(f"{MODEL}_{key}", [tensor(x)], parameters={"routing_priority": "speed"})
        assert strings(result, "passes") == [key] * 3 and result.get_response()["model_name"] == f"{MODEL}_{key}"
    with pytest.raises(InferenceServerException, match="below the requested floor fp32"):
        client.infer(f"{MODEL}_int8", [tensor(x)], parameters={"min_precision": "fp32"})


def test_two_stage_passes_come_back_per_sample(repo):
    _, x = model_input(2, seed=4)
    with _serve(repo, router=FakePlanRouter(int8__hflip=0.99)) as u:
        c = triton_http.InferenceServerClient(u.removeprefix("http://"))
        result = c.infer(MODEL, [tensor(x)], parameters={"routing_priority": "quality"})
        assert strings(result, "passes") == ["int8,int8:hflip"] * 2
        assert result.get_response()["parameters"]["followups"] == 2
        # the budget leaves no room for the 30 ms flipped pass after the 30 ms entry: none is sent
        tight = c.infer(MODEL, [tensor(x)], parameters={"routing_priority": "quality", "latency_budget_ms": 45})
        assert strings(tight, "passes") == ["int8"] * 2
        pinned = c.infer(f"{MODEL}_int8", [tensor(x)], parameters={"routing_priority": "quality"})
        assert strings(pinned, "passes") == ["int8"] * 2
        assert metric(httpx.Client(base_url=u), "aq_followups_total", plan="int8:hflip") == 2
        c.close()


def _v2(u: str, body: dict | bytes, model: str = MODEL, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{u}/v2/models/{model}/infer", content=content, headers=headers)


def _images_json(n: int = 1, **changes) -> dict:
    _, x = model_input(n)
    inp = {"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
    inp.update(changes)
    return {"inputs": [inp]}


def _binary(n: int = 1, size_delta: int = 0, tail_delta: int = 0) -> tuple[bytes, str]:
    _, x = model_input(n)
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw) + size_delta},
                }
            ]
        }
    ).encode()
    return head + raw + b"\0" * tail_delta, str(len(head))


BAD = [
    ("wrong shape", _images_json(shape=[1, 3, 28, 28]), "must have shape ['N', 3, 32, 32]"),
    ("wrong rank", _images_json(shape=[3, 32, 32]), "must have shape"),
    ("wrong datatype", _images_json(datatype="FP16"), "must have datatype FP32, got 'FP16'"),
    ("wrong name", _images_json(name="input__0"), "unknown input 'input__0'; this model takes 'images'"),
    ("too few values", _images_json(data=[0.0] * 100), "needs 3072 values, 'data' holds 100"),
    ("strings as data", _images_json(data=["a"] * 3072), "'data' must hold numbers"),
    ("no inputs", {"inputs": []}, "'inputs' must be a non-empty list"),
    ("both inputs", {"inputs": _images_json()["inputs"] * 2}, "appears twice"),
    ("unknown output", {**_images_json(), "outputs": [{"name": "probs"}]}, "unknown output 'probs'"),
    ("bad budget", {**_images_json(), "parameters": {"latency_budget_ms": -3}}, "latency_budget_ms must be a positive"),
    ("budget as text", {**_images_json(), "parameters": {"latency_budget_ms": "soon"}}, "positive number"),
    ("bad priority", {**_images_json(), "parameters": {"priority": "fastest"}}, "unknown priority 'fastest'"),
    ("bad floor", {**_images_json(), "parameters": {"min_precision": "fp64"}}, "unknown precision 'fp64'"),
    ("sequence", {**_images_json(), "parameters": {"sequence_id": 4}}, "not stateful"),
    ("not json", b"{inputs", "not JSON"),
    ("a list", b"[1, 2]", "must be a JSON object"),
]


@pytest.mark.parametrize("case,body,message", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_a_400_in_the_protocols_shape(url, case, body, message):
    r = _v2(url, body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_binary_sizes_unknown_models_and_limits(url):
    for delta, tail, message in [
        (-4, 0, "binary_data_size is 12284 bytes, but shape [1, 3, 32, 32] of FP32 needs 12288"),
        (0, 8, "carries 12296 bytes after the JSON header, but the inputs' binary_data_size add up to 12288"),
        (0, -8, "runs past the body's end"),
    ]:
        body, length = _binary(1, delta, 0)
        body = body[:tail] if tail < 0 else body + b"\0" * tail
        r = _v2(url, body, **{"Inference-Header-Content-Length": length})
        assert r.status_code == 400 and message in r.json()["error"], r.text
    body, _ = _binary(1)
    r = _v2(url, body, **{"Inference-Header-Content-Length": "lots"})
    assert r.status_code == 400 and "Inference-Header-Content-Length must be" in r.json()["error"]
    r = _v2(url, _images_json(), model="cifar_resnet")
    assert r.status_code == 404 and r.json()["error"].startswith("unknown model 'cifar_resnet'")
    r = httpx.post(f"{url}/v2/models/{MODEL}/versions/3/infer", json=_images_json())
    assert r.status_code == 404 and "no version '3'" in r.json()["error"]
    r = _v2(url, _images_json(65), **{})
    assert r.status_code == 413 and "at most 64 per request" in r.json()["error"]
    bomb = gzip.compress(b" " * 9_000_000)  # inflates past the 8 MiB limit
    r = _v2(url, bomb, **{"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "inflates past" in r.json()["error"]
    r = _v2(url, b"\x1f\x8bnot gzip", **{"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
    r = httpx.get(f"{url}/v2/repository/index")
    assert r.status_code == 404 and "not served here" in r.json()["error"]
    # NaN cannot come as JSON text through tritonclient, but a binary tensor can carry it
    _, x = model_input(1)
    x[0, 0, 0, 0] = np.nan
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 12288},
                }
            ]
        }
    ).encode()
    r = _v2(url, head + x.tobytes(), **{"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "finite values" in r.json()["error"]


def test_after_bad_requests_the_service_still_serves_and_counts_them(client, url):
    _, x = model_input(2, seed=5)
    assert client.infer(MODEL, [tensor(x)]).as_numpy("logits").shape == (2, 10)
    with httpx.Client(base_url=url) as http:
        assert metric(http, "aq_requests_total", outcome="client_error") >= len(BAD)
        assert metric(http, "aq_requests_total", outcome="error") == 0


def test_an_api_key_guards_v2_but_not_its_probes(repo):
    with _serve(repo, **{"server.api_key": KEY}) as u:
        c = triton_http.InferenceServerClient(u.removeprefix("http://"))
        assert c.is_server_live() and c.is_server_ready()  # probes stay open
        with pytest.raises(InferenceServerException, match="needs an API key") as err:
            c.get_model_metadata(MODEL)
        assert err.value.status() == "401"
        _, x = model_input(1)
        with pytest.raises(InferenceServerException, match="needs an API key"):
            c.infer(MODEL, [tensor(x)])
        result = c.infer(MODEL, [tensor(x)], headers={"X-API-Key": KEY})
        assert result.as_numpy("logits").shape == (1, 10)
        c.close()
