"""The fronts as one app: middleware wraps every route, the fast ones (POST /v1/classify, v2
infer) included, and one refusal reads the same on the v1, v2 REST and v2 gRPC fronts."""

from __future__ import annotations

import re
import socket

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from adaptive_quant.core.images import to_model_input
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.errors import InputError, refusal
from adaptive_quant.serving.settings import load_settings
from gateway_repo import MODEL, b64_instance, build_repo, images
from http_server import serve_in_thread
from prometheus_scrape import metric

KEY = "k3y"
GENERATED_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]+$")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def make_app(repo, **overrides):
    return create_app(load_settings(overrides={"repository": str(repo), **overrides}, environ={}))


def v1_body() -> dict:
    return {"instances": [b64_instance(images(1)[0])]}


def v2_body() -> dict:
    x = to_model_input(images(1), CIFAR10_MEAN, CIFAR10_STD)
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


INFER = f"/v2/models/{MODEL}/infer"


class Recorder:
    """A plain ASGI middleware that notes every HTTP request it sees and the status answered."""

    seen: list[tuple[str, str, int]] = []

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def noting(message):
            if message["type"] == "http.response.start":
                Recorder.seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, noting)


def test_a_middleware_added_to_the_app_wraps_the_fast_routes(repo):
    app = make_app(repo)
    app.add_middleware(Recorder)
    Recorder.seen.clear()
    with TestClient(app) as c:
        assert c.post("/v1/classify", json=v1_body()).status_code == 200
        assert c.post(INFER, json=v2_body()).status_code == 200
        assert c.post(f"/v2/models/{MODEL}/versions/1/infer", json=v2_body()).status_code == 200
        assert c.get("/healthz").status_code == 200
    assert Recorder.seen == [
        ("POST", "/v1/classify", 200),
        ("POST", INFER, 200),
        ("POST", f"/v2/models/{MODEL}/versions/1/infer", 200),
        ("GET", "/healthz", 200),
    ]


def test_every_answer_carries_a_request_id_the_callers_when_sane(repo):
    with TestClient(make_app(repo)) as c:
        answers = [
            c.post("/v1/classify", json=v1_body()),
            c.post(INFER, json=v2_body()),
            c.post("/v1/classify", content=b"not json"),  # a refusal on the fast route
            c.get("/v1/nothing"),  # FastAPI's own 404
            c.get("/healthz"),
        ]
        ids = [r.headers["X-Request-Id"] for r in answers]
        assert [r.status_code for r in answers] == [200, 200, 400, 404, 200]
        assert all(GENERATED_ID.match(i) for i in ids) and len(set(ids)) == len(ids), ids
        r = c.post("/v1/classify", json=v1_body(), headers={"X-Request-Id": "trace-7f3a:1"})
        assert r.headers["X-Request-Id"] == "trace-7f3a:1"
        r = c.post(INFER, json=v2_body(), headers={"X-Request-Id": "req 1; drop"})  # odd: replaced
        assert GENERATED_ID.match(r.headers["X-Request-Id"])
        assert c.get("/readyz", headers={"X-Request-Id": "x" * 129}).headers["X-Request-Id"] != "x" * 129


def test_with_an_api_key_both_fast_routes_refuse_a_missing_key_in_their_own_shape(repo):
    with TestClient(make_app(repo, **{"server.api_key": KEY})) as c:
        v1 = c.post("/v1/classify", json=v1_body())
        v2 = c.post(INFER, json=v2_body())
        assert v1.status_code == v2.status_code == 401
        message = v1.json()["error"]["message"]
        assert v1.json()["error"]["type"] == "unauthorized" and "X-API-Key" in message
        assert v2.json() == {"error": message}  # the protocol's shape, the same words
        for r in (v1, v2):
            assert r.headers["WWW-Authenticate"].startswith("Bearer") and r.headers["X-Request-Id"]
        assert c.post("/v1/classify", json=v1_body(), headers={"X-API-Key": KEY}).status_code == 200
        assert c.post(INFER, json=v2_body(), headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert metric(c, "aq_unauthorized_total") == 2
        assert metric(c, "aq_requests_total", outcome="ok") == 2  # the refused never reached the dataplane


def test_the_error_table_gives_one_message_to_every_front():
    r = refusal(InputError("X-Min-Precision fp32: not offered"))
    assert (r.status, r.kind.grpc_code) == (422, grpc.StatusCode.INVALID_ARGUMENT)
    status, headers, body = r.http_answer(v2=False)
    assert status == 422 and body == b'{"error":{"type":"invalid_input","message":"X-Min-Precision fp32: not offered"}}'
    assert r.http_answer(v2=True)[2] == b'{"error":"X-Min-Precision fp32: not offered"}'


def test_one_input_error_reads_the_same_on_v1_v2_rest_and_grpc(repo):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = make_app(repo, variants=["int8"], **{"server.grpc_port": port})  # offers int8 only
    with serve_in_thread(app) as url:
        v1 = httpx.post(f"{url}/v1/classify", json=v1_body(), headers={"X-Min-Precision": "fp32"})
        v2 = httpx.post(f"{url}{INFER}", json={**v2_body(), "parameters": {"min_precision": "fp32"}})
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            x = to_model_input(images(1), CIFAR10_MEAN, CIFAR10_STD).astype(np.float32)
            t = triton_grpc.InferInput("images", list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as err:
                client.infer(MODEL, [t], parameters={"min_precision": "fp32"})
        finally:
            client.close()
    message = v1.json()["error"]["message"]
    assert message == "X-Min-Precision fp32: this service offers no variant at or above it (offers int8)"
    assert (v1.status_code, v1.json()["error"]["type"]) == (422, "invalid_input")
    assert (v2.status_code, v2.json()) == (422, {"error": message})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and err.value.message() == message
