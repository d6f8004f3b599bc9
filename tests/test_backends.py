"""Backends: the dynamic batcher, the embedded ONNX Runtime backend, the Triton backend's start-up checks."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.serving.backends.base import BackendError, VariantUnavailable
from adaptive_quant.serving.backends.batcher import DynamicBatcher
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.backends.triton import TritonBackend
from gateway_repo import build_repo, images


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


class RecordingModel:
    """A stand-in model: doubles its input and records the batch sizes it was called with."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.block = block

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.block is not None:
            self.block.wait(5)
        self.sizes.append(x.shape[0])
        return x * 2


def run_batcher(model, coro_fn, **kw):
    async def main():
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(model, pool, **kw)
            b.start()
            try:
                return await coro_fn(b)
            finally:
                await b.close()

    return asyncio.run(main())


def test_concurrent_requests_are_gathered_into_one_call():
    model = RecordingModel()

    async def go(b):
        xs = [np.full((1, 2), i, dtype=np.float32) for i in range(5)]
        return await asyncio.gather(*(b.submit(x) for x in xs))

    outs = run_batcher(model, go, max_batch_size=32, max_queue_delay_us=20_000)
    assert model.sizes == [5]  # five requests, one model call
    assert [float(o[0, 0]) for o in outs] == [0.0, 2.0, 4.0, 6.0, 8.0]  # each got its own rows back


def test_batches_never_exceed_max_batch_size_and_big_requests_are_split():
    model = RecordingModel()

    async def go(b):
        big = np.arange(10, dtype=np.float32).reshape(10, 1)
        small = [np.ones((3, 1), dtype=np.float32) for _ in range(3)]
        return await asyncio.gather(b.submit(big), *(b.submit(s) for s in small))

    outs = run_batcher(model, go, max_batch_size=4, max_queue_delay_us=0)
    assert max(model.sizes) <= 4 and sum(model.sizes) == 19
    assert outs[0][:, 0].tolist() == [2.0 * i for i in range(10)]  # order preserved across chunks


def test_requests_queue_while_the_instance_is_busy_then_go_together():
    gate = threading.Event()
    model = RecordingModel(block=gate)

    async def go(b):
        first = asyncio.ensure_future(b.submit(np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)  # the first call is running (blocked) on the only instance
        rest = [asyncio.ensure_future(b.submit(np.zeros((1, 1), np.float32))) for _ in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)

    run_batcher(model, go, max_batch_size=32, max_queue_delay_us=0, instances=1)
    assert model.sizes == [1, 6]  # no delay configured, yet the six waiting requests share one call


def test_abandoned_requests_are_not_computed_and_errors_reach_every_caller():
    gate = threading.Event()
    model = RecordingModel(block=gate)

    async def go(b):
        busy = asyncio.ensure_future(b.submit(np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        abandoned = asyncio.ensure_future(b.submit(np.zeros((5, 1), np.float32)))
        await asyncio.sleep(0.01)
        abandoned.cancel()  # the gateway's deadline gave up on it
        kept = asyncio.ensure_future(b.submit(np.zeros((2, 1), np.float32)))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(busy, kept)

    run_batcher(model, go, max_batch_size=32)
    assert model.sizes == [1, 2]

    def broken(x):
        raise RuntimeError("kernel exploded")

    async def go_broken(b):
        return await asyncio.gather(*(b.submit(np.zeros((1, 1), np.float32)) for _ in range(3)), return_exceptions=True)

    errors = run_batcher(broken, go_broken)
    assert all(isinstance(e, RuntimeError) and "kernel exploded" in str(e) for e in errors)


def test_embedded_backend_answers_like_onnxruntime_and_batches(repo):
    manifest = load_manifest(repo)
    x = to_model_input(images(70, seed=3), manifest.mean, manifest.std)

    async def go():
        backend = EmbeddedBackend(repo, manifest, max_batch_size=32)
        await backend.start()
        try:
            assert backend.ready() and all(h.healthy for h in backend.variants().values())
            outs = {k: await backend.infer(k, x) for k in ("fp32", "fp16", "int8")}
            with pytest.raises(VariantUnavailable):
                await backend.infer("int4", x)
            return outs, backend.batch_stats()
        finally:
            await backend.close()

    outs, stats = asyncio.run(go())
    direct = ort.InferenceSession(str(repo / manifest.variants["fp32"].path)).run(["logits"], {"images": x})[0]
    np.testing.assert_allclose(outs["fp32"], direct, rtol=1e-5, atol=1e-5)
    assert outs["fp16"].dtype == np.float32 and np.abs(outs["fp16"] - direct).max() < 0.05
    assert np.abs(outs["int8"] - direct).max() < 0.5  # quantised, yet close
    assert (outs["int8"].argmax(1) == direct.argmax(1)).mean() > 0.9
    assert stats["fp32"]["largest_batch"] == 32 and stats["fp32"]["samples"] == 70  # split at max_batch_size


def test_embedded_backend_leaves_a_corrupt_variant_out(tmp_path):
    repo = build_repo(tmp_path)
    manifest = load_manifest(repo)
    (repo / manifest.variants["fp16"].path).write_bytes(b"not an onnx file")
    (repo / manifest.variants["int8"].path).write_bytes(b"\x08\x07garbage")

    async def go(verify):
        backend = EmbeddedBackend(repo, manifest, verify_sha256=verify)
        await backend.start()
        try:
            x = np.zeros((2, 3, 32, 32), np.float32)
            return backend.variants(), backend.ready(), (await backend.infer("fp32", x)).shape
        finally:
            await backend.close()

    health, ready, shape = asyncio.run(go(verify=True))
    assert ready and shape == (2, 10) and health["fp32"].healthy
    assert not health["fp16"].healthy and "sha256" in health["fp16"].detail
    health, ready, _ = asyncio.run(go(verify=False))  # past the checksum, ONNX Runtime itself refuses
    assert not health["fp16"].healthy and "cannot load" in health["fp16"].detail
    assert not health["int8"].healthy and health["fp32"].healthy


# ----------------------------------------------------------------------------- Triton (fake server)


class FakeTritonClient:
    """Answers like tritonclient's aio client for a server holding `configs` (model → config)."""

    def __init__(self, configs, ready=True, session=None):
        self.configs, self.ready_, self.session, self.calls = configs, ready, session, []

    async def is_server_ready(self):
        if self.ready_ is None:
            raise ConnectionRefusedError("connect failed")
        return self.ready_

    async def is_model_ready(self, model, model_version=""):
        return model in self.configs

    async def get_model_config(self, model, model_version="", **kwargs):
        return {"config": self.configs[model]}

    async def infer(self, model, inputs, model_version="", outputs=None):
        self.calls.append((model, inputs[0].shape()))
        if self.session is None:
            raise RuntimeError("server error")
        n = inputs[0].shape()[0]
        logits = np.zeros((n, 10), np.float32)

        class Result:
            def as_numpy(self, name):
                return logits

        return Result()

    async def close(self):
        pass


def triton_config(name, dims=("3", "32", "32"), dtype="TYPE_FP32", input_name="images"):
    return {
        "name": name,
        "max_batch_size": 8,
        "input": [{"name": input_name, "data_type": dtype, "dims": list(dims)}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}],
    }


def test_triton_backend_checks_readiness_and_configs_once(repo):
    manifest = load_manifest(repo)
    configs = {
        "tiny_fp32": triton_config("tiny_fp32"),
        "tiny_fp16": triton_config("tiny_fp16", dims=("3", "64", "64")),  # disagrees with the manifest
        # tiny_int8 not loaded on the server
    }
    client = FakeTritonClient(configs, session=True)

    async def go():
        backend = TritonBackend(manifest, url="fake:8001", client_factory=lambda url: client)
        await backend.start()
        health = backend.variants()
        out = await backend.infer("fp32", np.zeros((20, 3, 32, 32), np.float32))
        with pytest.raises(VariantUnavailable):
            await backend.infer("fp16", np.zeros((1, 3, 32, 32), np.float32))
        await backend.close()
        return health, out

    health, out = asyncio.run(go())
    assert health["fp32"].healthy
    assert not health["fp16"].healthy and "dims [3, 64, 64]" in health["fp16"].detail
    assert not health["int8"].healthy and "not ready" in health["int8"].detail
    assert out.shape == (20, 10)
    assert [shape[0] for _, shape in client.calls] == [8, 8, 4]  # split at the model's max_batch_size


def test_triton_backend_unreachable_server_marks_everything_unhealthy(repo):
    manifest = load_manifest(repo)

    async def go():
        backend = TritonBackend(manifest, url="nowhere:1", client_factory=lambda url: FakeTritonClient({}, ready=None))
        await backend.start()
        try:
            with pytest.raises(BackendError):
                await backend.infer("fp32", np.zeros((1, 3, 32, 32), np.float32))
            return backend.variants(), backend.ready()
        finally:
            await backend.close()

    health, ready = asyncio.run(go())
    assert not ready and all("unreachable" in h.detail for h in health.values())


class ThreadRecordingModel(RecordingModel):
    """Also records which thread each call ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        return super().__call__(x)


def run_inline_batcher(model, coro_fn, contended, **kw):
    async def main():
        with ThreadPoolExecutor(2) as pool:
            b = DynamicBatcher(model, pool, contended=lambda: contended["now"], **kw)
            b.start()
            try:
                return threading.get_ident(), await coro_fn(b)
            finally:
                await b.close()

    return asyncio.run(main())


def test_small_batches_compute_on_the_event_loop_and_large_ones_in_the_pool():
    model = ThreadRecordingModel()
    contended = {"now": False}

    async def go(b):
        one = await b.submit(np.ones((1, 1), np.float32))  # alone in the gateway: at once, on the loop
        contended["now"] = True  # other requests in flight: callers queue and batch
        together = await asyncio.gather(*(b.submit(np.ones((1, 1), np.float32)) for _ in range(3)))
        big = await asyncio.gather(*(b.submit(np.ones((2, 1), np.float32)) for _ in range(4)))
        return one, together, big

    loop_thread, (one, together, big) = run_inline_batcher(model, go, contended, max_batch_size=32, inline_max_batch=4)
    assert float(one[0, 0]) == 2.0 and all(float(t[0, 0]) == 2.0 for t in together)
    assert all(g.shape == (2, 1) and float(g[0, 0]) == 2.0 for g in big)
    # the lone request; the three gathered into one batch of 3 (<= 4: on the loop); 8 samples in the pool
    assert model.sizes == [1, 3, 8]
    assert model.threads[:2] == [loop_thread, loop_thread] and model.threads[2] != loop_thread


def test_inline_is_off_when_a_queue_delay_is_configured():
    model = ThreadRecordingModel()

    async def go(b):
        return await asyncio.gather(*(b.submit(np.ones((1, 1), np.float32)) for _ in range(2)))

    run_batcher(model, go, max_batch_size=32, max_queue_delay_us=20_000, inline_max_batch=4)
    assert model.sizes == [2] and threading.get_ident() not in model.threads


def test_inline_limits_follow_each_variants_cost(repo):
    from adaptive_quant.serving.backends.embedded import inline_limits

    served = load_manifest(repo).served_variants()  # profiled batch-1 p95: int8 30, fp32 80, fp16 90 ms
    assert inline_limits(served, 4) == {"int8": 4, "fp32": 1, "fp16": 1}
    assert inline_limits(served, 12) == {"int8": 12, "fp32": 4, "fp16": 4}
    assert inline_limits(served, 0) == {"int8": 0, "fp32": 0, "fp16": 0}
