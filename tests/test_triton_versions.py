"""Model versions side by side on a REAL Triton (the tritonserver binary nvidia-pytriton ships), explicit
model control: version 2 loads while version 1 keeps answering, each backend answers with its own
version's logits, and a retired version leaves Triton while the other keeps serving. One server for
the module (1 s exit timeout), on the Python-backend flavour of the tiny test repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("pytriton", reason="needs nvidia-pytriton (pinned in requirements.txt)")

import tritonclient.grpc as grpcclient  # noqa: E402

from adaptive_quant.core.manifest import load_manifest, save_manifest, sha256_file  # noqa: E402
from adaptive_quant.core.versions import load_version_manifest, read_index, with_canary, write_index  # noqa: E402
from adaptive_quant.export.triton_config import policy_versions  # noqa: E402
from adaptive_quant.export.triton_python import served_model_names, write_python_flavor  # noqa: E402
from adaptive_quant.export.versions import add_version, set_version_policy  # noqa: E402
from adaptive_quant.serving.backends.triton import TritonBackend  # noqa: E402
from adaptive_quant.tools.triton_server import LocalTriton, TritonServerConfig  # noqa: E402
from gateway_repo import build_repo  # noqa: E402

KEYS = ("fp32", "fp16", "int8")


def permuted_copy(root: Path) -> Path:
    """A staged repository: the tiny networks with the last Gemm's rows (and biases) reversed, so
    every logit moves to the mirrored class: version 2's logits are version 1's [:, ::-1]."""
    staged = build_repo(root)
    manifest = load_manifest(staged)
    for v in manifest.variants.values():
        path = staged / v.path
        model = onnx.load(path)
        for init in model.graph.initializer:
            if init.name in ("w2", "w2_q", "b2"):  # (10, 8) weights, int8 in the QDQ graph; (10,) bias
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
        onnx.save(model, path)
        v.sha256, v.size_bytes = sha256_file(path), path.stat().st_size
    save_manifest(staged, manifest)
    return staged


@pytest.fixture(scope="module")
def pyrepo(tmp_path_factory):
    """The serving repository: version 1 only (no versions.json yet), python-flavoured."""
    repo = build_repo(tmp_path_factory.mktemp("repo"))
    return write_python_flavor(repo, tmp_path_factory.mktemp("pyrepo") / "repo")


@pytest.fixture(scope="module")
def triton(pyrepo, tmp_path_factory):
    cfg = TritonServerConfig.explicit(pyrepo, served_model_names(pyrepo), exit_timeout_s=1)
    server = LocalTriton(cfg, workdir=tmp_path_factory.mktemp("triton"))
    server.start(timeout_s=60)
    yield server
    server.stop()


def instance_inits(triton) -> int:
    """Model instances Triton has initialised so far (one per loaded model version here)."""
    return triton.log_path.read_text(errors="replace").count("TRITONBACKEND_ModelInstanceInitialize")


def stubs(triton, version: int) -> dict[str, int]:
    """{model.py path: pid} of the Python-backend stubs serving `version` (one process per instance)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != triton.process.pid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        paths = [a.decode() for a in args if a.endswith(f"/{version}/model.py".encode())]
        if paths:
            found[paths[0]] = int(entry.name)
    return found


def ready_versions(triton, model: str) -> set[str]:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        return {v for v in ("1", "2") if client.is_model_ready(model, v)}
    finally:
        client.close()


# ----------------------------------------------------------------------------- the python flavour


def test_python_flavour_of_a_versioned_repository_writes_every_live_version(tmp_path):
    prod = build_repo(tmp_path / "prod")  # the production flavour (backend "onnxruntime")
    n, _ = add_version(permuted_copy(tmp_path / "staged"), prod)
    assert n == 2
    write_index(prod, with_canary(read_index(prod), 2, 0.1, 0.2, "2026-12-03T14:00:00Z"))
    set_version_policy(prod, [1, 2])

    out = write_python_flavor(prod, tmp_path / "py")
    assert json.loads((out / "versions.json").read_text()) == json.loads((prod / "versions.json").read_text())
    assert read_index(out).live() == [1, 2] and served_model_names(out) == ["tiny_fp32", "tiny_fp16", "tiny_int8"]
    assert load_manifest(out).version == 1  # manifest.json: the serving version's
    for version in (1, 2):
        src, got = load_version_manifest(prod, version), load_version_manifest(out, version)
        assert got.version == version and sorted(got.variants) == sorted(KEYS)
        for key, v in got.variants.items():
            assert v.path == f"{v.triton_name}/{version}/model.onnx"
            assert sha256_file(out / v.path) == src.variants[key].sha256  # the same bytes
            assert (out / v.triton_name / str(version) / "model.py").is_file()
    for name in ("tiny_fp32", "tiny_fp16", "tiny_int8"):
        config = (out / name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and policy_versions(config) == [1, 2]

    # written again beside a running Triton: the version folders it serves are not touched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("tiny_*/*/*")}
    time.sleep(0.01)
    write_python_flavor(prod, out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("tiny_*/*/*")} == stamps


# ----------------------------------------------------------------------------- versions on Triton


def test_version_2_loads_while_version_1_answers_then_version_1_retires(pyrepo, triton, tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    opts = {"model_control": "explicit", "health_interval_s": 0.2, "retire_quiet_s": 0.5}
    measured: dict[str, float] = {}

    async def go():
        v1 = TritonBackend(load_manifest(pyrepo), url=triton.grpc_url, **opts)
        await v1.start()
        assert v1.ready() and v1.version == 1, v1.variants()
        ref = {k: await v1.infer(k, x) for k in KEYS}
        v1_stubs, inits = stubs(triton, 1), instance_inits(triton)
        assert len(v1_stubs) == 3
        # a redundant load (another worker's) changes nothing: the flavour's version folders hold
        # model.py's bytecode, so the stub writes nothing there that Triton would take for a change
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        client.load_model("tiny_fp32")
        client.close()
        assert stubs(triton, 1) == v1_stubs and instance_inits(triton) == inits

        n, _ = add_version(permuted_copy(tmp_path / "staged"), pyrepo)
        assert n == 2
        set_version_policy(pyrepo, [1, 2])  # what the roll-out sets for a canary
        # model.py's bytecode came with the version (export.triton_python.write_model_py): the stub
        # writes nothing into the version folder that a later load_model would take for a change
        precompiled = all(
            (pyrepo / name / "2" / "__pycache__").is_dir() for name in ("tiny_fp32", "tiny_fp16", "tiny_int8")
        )
        m2 = load_version_manifest(pyrepo, 2)

        outcomes: list[bool | Exception] = []  # version 1's answers while version 2 loads
        stop = asyncio.Event()

        async def call_v1(backend: TritonBackend) -> None:
            while not stop.is_set():
                for k in KEYS:
                    try:
                        outcomes.append(bool(np.allclose(await backend.infer(k, x), ref[k], atol=1e-5)))
                    except Exception as exc:  # noqa: BLE001 - any failure is the finding
                        outcomes.append(exc)

        caller = asyncio.create_task(call_v1(v1))
        # two gateway workers start version 2 at once, one over gRPC, one over HTTP
        v2a = TritonBackend(m2, url=triton.grpc_url, **opts)
        v2b = TritonBackend(m2, url=triton.http_url, protocol="http", **opts)
        t0 = time.perf_counter()
        await asyncio.gather(v2a.start(), v2b.start())
        measured["load_s"] = time.perf_counter() - t0
        stop.set()
        await caller
        assert v2a.ready() and v2b.ready(), (v2a.variants(), v2b.variants())
        assert len(outcomes) >= 3 and all(o is True for o in outcomes), [o for o in outcomes if o is not True][:3]
        measured["v1_calls_during_load"] = len(outcomes)
        assert stubs(triton, 1) == v1_stubs  # version 1 kept its instances: it was not reloaded
        measured["v2_instance_inits"] = instance_inits(triton) - inits
        if precompiled:  # one instance per model: the second worker's load found nothing to reload
            assert measured["v2_instance_inits"] == 3

        for k in KEYS:  # each backend answers with its own version's logits
            got2a, got2b, got1 = await v2a.infer(k, x), await v2b.infer(k, x), await v1.infer(k, x)
            np.testing.assert_allclose(got2a, ref[k][:, ::-1], atol=1e-5, err_msg=k)
            np.testing.assert_allclose(got2b, got2a, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(got1, ref[k], atol=1e-5, err_msg=k)
            assert (got2a.argmax(1) != got1.argmax(1)).all()
        assert {s["version"] for s in v2a.model_states().values()} == {2}

        # version 1 leaves the policy; one worker retires it while another still sends it requests
        set_version_policy(pyrepo, [2])
        other = TritonBackend(load_version_manifest(pyrepo, 1), url=triton.grpc_url, **opts)
        await other.start()
        outcomes.clear()
        stop.clear()
        caller = asyncio.create_task(call_v1(other))
        t0 = time.perf_counter()
        retiring = asyncio.create_task(v1.retire())
        await asyncio.sleep(1.0)  # s the other worker keeps using version 1
        assert not retiring.done() and not v1.ready()  # routing stopped here; Triton still holds it
        stop.set()
        await caller
        await retiring
        measured["retire_s"] = time.perf_counter() - t0
        assert outcomes and all(o is True for o in outcomes)
        assert measured["retire_s"] >= 1.0 + opts["retire_quiet_s"]
        for name in ("tiny_fp32", "tiny_fp16", "tiny_int8"):
            assert ready_versions(triton, name) == {"2"}
        for k in KEYS:
            np.testing.assert_allclose(await v2a.infer(k, x), ref[k][:, ::-1], atol=1e-5, err_msg=k)
        t0 = time.perf_counter()
        await other.retire()  # the other worker's retire: version 1 is gone already, nothing to do
        measured["second_retire_s"] = time.perf_counter() - t0
        assert measured["second_retire_s"] < 1.0 + opts["retire_quiet_s"]

        # the memory policy's unload/load of a variant still work on a versioned model
        await v2a.unload_variant("fp16", "test")
        assert not v2a.variants()["fp16"].healthy and ready_versions(triton, "tiny_fp16") == set()
        health = await v2a.load_variant("fp16", "test")
        assert health.healthy and ready_versions(triton, "tiny_fp16") == {"2"}
        np.testing.assert_allclose(await v2a.infer("fp16", x), ref["fp16"][:, ::-1], atol=1e-3)
        for b in (v1, other, v2a, v2b):
            await b.close()

    asyncio.run(go())
    print(f"\nmeasured: {measured}")
