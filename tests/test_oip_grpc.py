"""The Open Inference Protocol's gRPC front, driven by Triton's own client (tritonclient.grpc)
against a real gateway (uvicorn in a thread, the gRPC server in its event loop): readiness,
metadata, config, inference that matches /v1/classify, routing parameters, pinned variants,
every kind of bad input refused with the HTTP front's message and a gRPC code, an API key."""

from __future__ import annotations

import socket

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.stats import softmax
from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.settings import SettingsError, load_settings
from fake_backends import FakeFlakyBackend
from gateway_repo import MODEL, build_repo, images, pixels_instance
from http_server import serve_in_thread
from prometheus_scrape import metric

KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def _serve(repo, backend=None, **overrides):
    """(HTTP base URL, gRPC host:port) of a gateway serving both fronts."""
    port = free_port()
    settings = load_settings(
        overrides={"repository": str(repo), "latency.ewma_alpha": 0.0, "server.grpc_port": port, **overrides},
        environ={},
    )
    return serve_in_thread(create_app(settings, backend=backend)), f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gateway(repo):
    """Single-stage (this repository ships no router): quality picks fp32 unless a budget forbids it."""
    server, target = _serve(repo)
    with server as url:
        yield url, target


@pytest.fixture(scope="module")
def client(gateway):
    c = triton_grpc.InferenceServerClient(gateway[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(gateway):
    """The generated stub itself, for what tritonclient never sends (typed contents, malformed requests)."""
    channel = grpc.insecure_channel(gateway[1])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def model_input(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    imgs = images(n, seed=seed)
    return imgs, to_model_input(imgs, CIFAR10_MEAN, CIFAR10_STD)


def tensor(x: np.ndarray, name: str = "images", datatype: str = "FP32", shape: list[int] | None = None):
    t = triton_grpc.InferInput(name, list(x.shape), datatype)
    t.set_data_from_numpy(x)
    if shape is not None:  # declare a shape the bytes do not fill
        t.set_shape(shape)
    return t


def strings(result, name: str) -> list[str]:
    return [v.decode() for v in result.as_numpy(name).reshape(-1)]


def params(result) -> dict:
    out = {}
    for key, p in result.get_response().parameters.items():
        out[key] = getattr(p, p.WhichOneof("parameter_choice"))
    return out


def refused(call, code: str, message: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call()
    assert err.value.status() == f"StatusCode.{code}", err.value
    assert message in err.value.message(), err.value.message()
    return err.value


def test_probes_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(f"{MODEL}_int8", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "adaptive-quant" and "classification" in meta["extensions"]
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["name"] == MODEL and model["versions"] == ["1"] and model["platform"] == "adaptive_quant"
    assert {"name": "images", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]} in model["inputs"]
    assert [o["name"] for o in model["outputs"]] == ["logits", "passes", "precision"]
    config = client.get_model_config(MODEL).config
    assert config.max_batch_size == 64 and list(config.output[0].dims) == [10]
    assert [i.name for i in config.input] == ["images", "pixels"] and all(i.optional for i in config.input)
    assert (
        "pinned to variant int8" in client.get_model_config(f"{MODEL}_int8").config.parameters["routing"].string_value
    )
    refused(lambda: client.get_model_metadata("resnet50"), "NOT_FOUND", "unknown model 'resnet50'; models: tiny, tiny_")
    refused(lambda: client.is_model_ready(MODEL, "7"), "NOT_FOUND", "has no version '7'; versions: 1")
    refused(lambda: client.get_model_config("resnet50"), "NOT_FOUND", "unknown model 'resnet50'")


def test_inference_matches_v1_classify_raw_and_typed(client, stub, gateway):
    imgs, x = model_input(5, seed=1)
    r = httpx.post(f"{gateway[0]}/v1/classify", json={"instances": [pixels_instance(i) for i in imgs]})
    v1 = r.json()["predictions"]
    raw = client.infer(MODEL, [tensor(x)], request_id="req-7")  # tritonclient: raw_input_contents
    pixels = client.infer(MODEL, [tensor(imgs, "pixels", "UINT8")], compression_algorithm="gzip")
    typed_images = _typed(stub, "images", "FP32", x.shape, fp32_contents=x.reshape(-1).tolist())
    typed_pixels = _typed(stub, "pixels", "UINT8", imgs.shape, uint_contents=imgs.reshape(-1).tolist())
    for result in (raw, pixels, triton_grpc.InferResult(typed_images), triton_grpc.InferResult(typed_pixels)):
        probs = softmax(result.as_numpy("logits"))
        assert probs.argmax(1).tolist() == [p["class_id"] for p in v1]
        np.testing.assert_allclose(probs.max(1), [p["confidence"] for p in v1], atol=1e-5)
        assert strings(result, "passes") == [",".join(p["passes"]) for p in v1]
        assert strings(result, "precision") == [p["precision"] for p in v1]
        assert params(result)["precision"] == r.json()["precision"]
        assert {"budget_met", "server_time_ms", "followups", "followups_lost", "fallbacks"} <= set(params(result))
    assert raw.get_response().id == "req-7" and raw.get_response().model_version == "1"
    # the classification extension: top-k as "score:index:label"
    top = client.infer(MODEL, [tensor(x)], outputs=[triton_grpc.InferRequestedOutput("logits", class_count=2)])
    first = strings(top, "logits")[0].split(":")
    assert top.as_numpy("logits").shape == (5, 2) and int(first[1]) == v1[0]["class_id"] and first[2] == v1[0]["label"]
    assert [o.name for o in top.get_response().outputs] == ["logits"]


def _typed(stub, name: str, datatype: str, shape, metadata=(), **contents):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape), contents=contents)
    return stub.ModelInfer(request, metadata=metadata)


def test_routing_parameters_change_what_answers(client):
    _, x = model_input(1, seed=2)

    def answer(**kwargs):
        result = client.infer(MODEL, [tensor(x)], **kwargs)
        return strings(result, "precision")[0], params(result)

    # profile: int8 30 ms, fp32 80 ms, fp16 90 ms at batch 1; quality takes the most accurate that fits
    assert answer(parameters={"routing_priority": "quality"})[0] == "fp32"
    got, p = answer(parameters={"routing_priority": "quality", "latency_budget_ms": 50})
    assert got == "int8" and p["latency_budget_ms"] == 50 and p["budget_met"] is True
    assert answer(parameters={"routing_priority": "speed", "min_precision": "fp16"})[0] in ("fp16", "fp32")
    # the REST front's headers work as gRPC metadata; a parameter wins over one
    assert answer(headers={"x-priority": "quality"})[0] == "fp32"
    assert answer(headers={"x-latency-budget-ms": "50"}, parameters={"routing_priority": "quality"})[0] == "int8"
    assert answer(headers={"x-latency-budget-ms": "50"}, parameters={"latency_budget_ms": 500.0})[1][
        "latency_budget_ms"
    ] == pytest.approx(500.0)
    # Triton's integer scheduling priority (uint64) is accepted and said to be ignored
    assert answer(priority=2, timeout=100_000)[1]["ignored_parameters"] == "priority,timeout"


def test_a_variant_by_its_triton_name_answers_alone(client):
    _, x = model_input(3, seed=3)
    for key in ("int8", "fp32"):
        result = client.infer(f"{MODEL}_{key}", [tensor(x)], parameters={"routing_priority": "speed"})
        assert strings(result, "passes") == [key] * 3 and result.get_response().model_name == f"{MODEL}_{key}"
    refused(
        lambda: client.infer(f"{MODEL}_int8", [tensor(x)], parameters={"min_precision": "fp32"}),
        "INVALID_ARGUMENT",
        "below the requested floor fp32",
    )


_, X1 = model_input(1)
_NAN = X1.copy()
_NAN[0, 0, 0, 0] = np.nan
_IMG, _ = model_input(1)
# (case, infer keyword arguments, gRPC code, the message's part that says what was wrong)
BAD = [
    ("wrong shape", dict(inputs=[tensor(np.zeros((1, 3, 28, 28), np.float32))]), "must have shape ['N', 3, 32, 32]"),
    ("wrong rank", dict(inputs=[tensor(X1[0])]), "must have shape"),
    (
        "wrong datatype",
        dict(inputs=[tensor(X1.astype(np.float16), datatype="FP16")]),
        "must have datatype FP32, got 'FP16'",
    ),
    ("wrong name", dict(inputs=[tensor(X1, name="input__0")]), "unknown input 'input__0'; this model takes 'images'"),
    (
        "byte size",
        dict(inputs=[tensor(X1[..., :31], shape=[1, 3, 32, 32])]),
        "raw_input_contents[0] is 11904 bytes, but shape [1, 3, 32, 32] of FP32 needs 12288",
    ),
    ("both inputs", dict(inputs=[tensor(X1), tensor(X1)]), "appears twice"),
    ("pixels and images", dict(inputs=[tensor(X1), tensor(_IMG, "pixels", "UINT8")]), "send one input"),
    (
        "unknown output",
        dict(inputs=[tensor(X1)], outputs=[triton_grpc.InferRequestedOutput("probs")]),
        "unknown output",
    ),
    ("not finite", dict(inputs=[tensor(_NAN)]), "must hold finite values"),
    ("bad budget", dict(parameters={"latency_budget_ms": -3}), "latency_budget_ms must be a positive"),
    ("budget as text", dict(parameters={"latency_budget_ms": "soon"}), "positive number"),
    ("bad priority", dict(parameters={"routing_priority": "fastest"}), "unknown priority 'fastest'"),
    ("bad floor", dict(parameters={"min_precision": "fp64"}), "unknown precision 'fp64'"),
    ("sequence", dict(sequence_id=4), "not stateful"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_invalid_arguments(client, case, kwargs, message):
    kwargs = {"inputs": [tensor(X1)], **kwargs}
    refused(lambda: client.infer(MODEL, **kwargs), "INVALID_ARGUMENT", message)


BAD_TYPED = [
    ("too few values", dict(fp32_contents=[0.0] * 100), "needs 3072 values, contents.fp32_contents holds 100"),
    ("wrong field", dict(int_contents=[0] * 3072), "takes contents.fp32_contents, got contents.int_contents"),
    ("no data", dict(), "has no data: send raw_input_contents or contents.fp32_contents"),
]


@pytest.mark.parametrize("case,contents,message", BAD_TYPED, ids=[c[0] for c in BAD_TYPED])
def test_bad_typed_contents_are_invalid_arguments(stub, case, contents, message):
    with pytest.raises(grpc.RpcError) as err:
        _typed(stub, "images", "FP32", [1, 3, 32, 32], **contents)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_unknown_models_limits_and_unserved_rpcs(client, stub):
    refused(lambda: client.infer("cifar_resnet", [tensor(X1)]), "NOT_FOUND", "unknown model 'cifar_resnet'")
    refused(lambda: client.infer(MODEL, [tensor(X1)], model_version="3"), "NOT_FOUND", "no version '3'")
    _, x = model_input(65)
    refused(lambda: client.infer(MODEL, [tensor(x)]), "RESOURCE_EXHAUSTED", "holds 65 images; at most 64 per request")
    with pytest.raises(grpc.RpcError) as err:
        _typed(stub, "pixels", "UINT8", [1, 32, 32, 3], uint_contents=[300] * 3072)
    assert "must hold integers from 0 to 255" in err.value.details()
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"", b""])
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 32, 32])
    with pytest.raises(grpc.RpcError, match="raw_input_contents holds 2 tensors for 1 inputs"):
        stub.ModelInfer(request)
    for call in (client.get_inference_statistics, client.get_model_repository_index, lambda: client.load_model(MODEL)):
        refused(call, "UNIMPLEMENTED", "is not served here; served: ServerLive")


def test_after_bad_requests_the_service_still_serves_and_counts_them(client, gateway):
    _, x = model_input(2, seed=5)
    assert client.infer(MODEL, [tensor(x)]).as_numpy("logits").shape == (2, 10)
    with httpx.Client(base_url=gateway[0]) as http:
        assert metric(http, "aq_requests_total", outcome="client_error") >= len(BAD) + len(BAD_TYPED)
        assert metric(http, "aq_requests_total", outcome="error") == 0


def test_an_api_key_guards_grpc_but_not_its_probes(repo):
    server, target = _serve(repo, **{"server.api_key": KEY})
    with server:
        c = triton_grpc.InferenceServerClient(target)
        assert c.is_server_live() and c.is_server_ready()  # probes stay open
        refused(lambda: c.get_model_metadata(MODEL), "UNAUTHENTICATED", "needs an API key and the request carried no")
        refused(lambda: c.infer(MODEL, [tensor(X1)]), "UNAUTHENTICATED", "needs an API key")
        refused(lambda: c.infer(MODEL, [tensor(X1)], headers={"x-api-key": "nope"}), "UNAUTHENTICATED", "a wrong")
        assert c.infer(MODEL, [tensor(X1)], headers={"x-api-key": KEY}).as_numpy("logits").shape == (1, 10)
        assert c.is_model_ready(MODEL, headers={"authorization": f"Bearer {KEY}"})
        c.close()
    with socket.socket() as sock:  # the lifespan stopped the gRPC server with the HTTP one
        assert sock.connect_ex(("127.0.0.1", int(target.rsplit(":", 1)[1]))) != 0


def test_when_no_variant_can_answer_it_is_unavailable_and_then_serves_again(repo):
    backend = FakeFlakyBackend(EmbeddedBackend(repo, load_manifest(repo)))
    server, target = _serve(repo, backend=backend, **{"breaker.cooldown_s": 0})
    with server as url:
        backend.fail = {"fp32", "fp16", "int8"}
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel := grpc.insecure_channel(target))
        request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[X1.tobytes()])
        request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 32, 32])
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no variant could answer" in err.value.details()
        assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
        backend.fail = set()
        assert len(stub.ModelInfer(request).raw_output_contents) == 3  # the outage is over: serving again
        channel.close()
        with httpx.Client(base_url=url) as http:
            assert metric(http, "aq_requests_total", outcome="unavailable") == 1


def test_grpc_port_setting():
    assert load_settings(environ={}).server.grpc_port == 0  # off unless asked for
    assert load_settings(environ={"AQ_SERVER__GRPC_PORT": "8081"}).server.grpc_port == 8081
    with pytest.raises(SettingsError, match="grpc_port"):
        load_settings(overrides={"server.grpc_port": "8000"}, environ={})
