"""Fuzzing over real HTTP: whatever a client sends, the gateway answers 2xx or a 4xx that says
what was wrong, never 5xx, and keeps serving.

Two generators: schemathesis, driven by the service's own OpenAPI schema (every operation,
valid and schema-violating bodies and headers), and hypothesis strategies aimed at the
classify decoder (arbitrary JSON, broken base64/images, odd pixel arrays, odd header values).
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from gateway_repo import b64_instance, build_repo, images, pixels_instance
from http_server import serve_in_thread

# small limits so the fuzzers reach them; fixed-seed examples keep CI reproducible
LIMITS = {"limits.max_instances": 4, "limits.max_request_bytes": 65536}
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    repo = build_repo(tmp_path_factory.mktemp("repo"))
    app = create_app(load_settings(overrides={"repository": str(repo), **LIMITS}, environ={}))
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def error_message(body: dict) -> str:
    """The message of either front's error: REST {"error": {"type", "message"}}, v2 {"error": "..."}."""
    err = body["error"]
    if isinstance(err, str):
        return err
    assert err["type"]
    return err["message"]


def check_answer(r: httpx.Response) -> None:
    """What a client may rely on: no 5xx; a 4xx carries a JSON error with a message."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        assert len(error_message(r.json())) > 10, r.text


# ----------------------------------------------------------------------------- schemathesis


# (schemathesis' own pytest plugin does not run under pytest 9 yet, so its strategies are
# driven by hypothesis here: one run per operation and generation mode)
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_schema_driven_fuzz_finds_no_5xx(base_url, mode):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/classify",
        "/v1/status",
        "/v1/models",
        "/readyz",
        "/metrics",
        "/v2/models/{model}/infer",
        "/v2/models/{model}",
        "/v2/health/ready",
    }
    seen: dict[int, int] = {}
    for op in operations:
        # nothing to send wrong: no input at all (GET /healthz), or only path strings, which any
        # string satisfies (GET /v2/models/{model}): negative generation has no input to break
        breakable = [p for p in op.iter_parameters() if str(getattr(p.location, "value", p.location)) != "path"]
        if mode == schemathesis.GenerationMode.NEGATIVE and not (breakable or list(op.body)):
            continue

        @given(case=op.as_strategy(generation_mode=mode))
        @FUZZ
        def run(case) -> None:
            r = case.call(base_url=base_url)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, f"{case.method} {case.formatted_path}: {r.status_code} {r.text[:500]}"
            content_type = (r.headers.get("content-type") or [""])[0]  # schemathesis: header → list
            if r.status_code >= 400 and content_type.startswith("application/json"):
                assert error_message(r.json())

        run()
    print(f"{mode.value}: responses by status {dict(sorted(seen.items()))}")
    if mode == schemathesis.GenerationMode.POSITIVE:
        assert seen.get(200, 0) > 0  # schema-valid requests are served
    else:
        assert sum(seen.values()) >= 50 and all(400 <= code < 500 for code in seen)  # schema-violating: refused


# ----------------------------------------------------------------------------- hypothesis on classify

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_tree = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
pixel_value = (
    st.integers(-300, 300) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["7", None, True])
)
pixels = st.one_of(
    st.lists(st.lists(st.lists(pixel_value, min_size=1, max_size=4), max_size=3), max_size=3),  # wrong shapes
    st.builds(
        lambda v, i, j, c: _patched(i, j, c, v), pixel_value, st.integers(0, 31), st.integers(0, 31), st.integers(0, 2)
    ),
)
b64 = st.one_of(
    st.text(max_size=40),  # not base64 at all
    st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),  # base64 of junk
    st.builds(lambda cut: b64_instance(images(1)[0])["b64"][:cut], st.integers(0, 200)),  # truncated PNG
    st.just(base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()),  # PNG signature, no image
)
instance = st.one_of(
    st.fixed_dictionaries({"b64": b64}),
    st.fixed_dictionaries({"pixels": pixels}),
    st.fixed_dictionaries({"b64": b64, "pixels": pixels}),
    json_tree,
)
body = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(instance, max_size=6)}),
    st.fixed_dictionaries({"instances": json_tree}),
    json_tree,
)
# printable ASCII without surrounding blanks: what HTTP can carry in a header value at all
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(str.strip)
headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Latency-Budget-Ms": header_text | st.sampled_from(["0", "-1", "nan", "inf", "1e309", "1e-300", "5"]),
        "X-Priority": header_text | st.sampled_from(["speed", "QUALITY", "balanced"]),
        "X-Min-Precision": header_text | st.sampled_from(["fp32", "int4", "FP16"]),
    },
)


def _patched(i: int, j: int, c: int, v) -> list:
    """A valid 32×32×3 image with one value replaced: the decoder must find it."""
    px = pixels_instance(images(1)[0])["pixels"]
    px[i][j][c] = v
    return px


@given(payload=body, hdrs=headers)
@FUZZ
def test_any_json_body_and_headers_get_200_or_a_4xx_that_explains(client, payload, hdrs):
    check_answer(client.post("/v1/classify", content=json.dumps(payload, allow_nan=True), headers=hdrs))


@given(raw=st.binary(max_size=2000) | st.text(max_size=200).map(str.encode))
@FUZZ
def test_raw_bytes_get_a_4xx_that_explains(client, raw):
    r = client.post("/v1/classify", content=raw, headers={"Content-Type": "application/json"})
    check_answer(r)
    assert r.status_code != 200 or json.loads(raw)["instances"]


# ----------------------------------------------------------------------------- hypothesis on v2 infer

tensor_value = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-300, 300) | json_leaf
v2_input = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["images", "pixels", "input__0"]) | st.text(max_size=8),
        "shape": st.sampled_from([[1, 3, 32, 32], [1, 32, 32, 3], [2, 3, 32, 32], [0, 3, 32, 32], [5, 3, 32, 32]])
        | st.lists(st.integers(-2, 40) | json_leaf, max_size=5),
        "datatype": st.sampled_from(["FP32", "UINT8", "FP16", "BYTES", "INT64"]) | st.text(max_size=6),
    },
    optional={
        "data": st.lists(tensor_value, max_size=40)
        | st.builds(lambda n, v: [v] * n, st.sampled_from([3072, 3071, 6144]), tensor_value)
        | json_tree,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-5, 30000) | json_leaf})
        | json_tree,
    },
)
v2_params = st.fixed_dictionaries(
    {},
    optional={
        "latency_budget_ms": json_leaf | st.sampled_from([5, 0, -1, "10", 1e309]),
        "priority": json_leaf | st.sampled_from(["quality", "speed", 3, -1]),
        "routing_priority": json_leaf | st.sampled_from(["balanced"]),
        "min_precision": json_leaf | st.sampled_from(["fp32", "int4"]),
        "binary_data_output": json_leaf,
        "sequence_id": json_leaf,
    },
)
v2_body = st.one_of(
    st.fixed_dictionaries(
        {"inputs": st.lists(v2_input, max_size=3)},
        optional={"parameters": v2_params | json_tree, "outputs": json_tree, "id": json_leaf},
    ),
    json_tree,
)


@given(payload=v2_body, tail=st.binary(max_size=64), header_length=st.none() | st.integers(-3, 4000) | header_text)
@FUZZ
def test_any_v2_infer_request_gets_200_or_a_4xx_that_explains(client, payload, tail, header_length):
    head = json.dumps(payload, allow_nan=True).encode()
    hdrs = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    check_answer(client.post("/v2/models/tiny/infer", content=head + tail, headers=hdrs))


def test_after_the_fuzzing_the_service_still_serves_and_counted_no_errors(client):
    r = client.post("/v1/classify", json={"instances": [b64_instance(images(1)[0])]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    requests = client.get("/v1/status").json()["routing"]["requests"]
    assert requests["error"] == 0 and requests["client_error"] > 100  # the fuzz really reached classify
