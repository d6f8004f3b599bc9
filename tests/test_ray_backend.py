"""The Ray engine's parts that need no cluster: the call coalescer, the latency model's replicas,
a variant replica's versions (on real ONNX Runtime sessions), the settings and the CLI's refusals."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest

from adaptive_quant.cli.serve import main as serve_main
from adaptive_quant.core.latency import LatencyConfig, LatencyEstimator
from adaptive_quant.core.manifest import LatencyPoint, LatencyProfile, load_manifest
from adaptive_quant.core.settings import ConfigError
from adaptive_quant.export.versions import add_serving_version
from adaptive_quant.serving.backends.base import VariantUnavailable
from adaptive_quant.serving.backends.ray import CallCoalescer, deployment_name
from adaptive_quant.serving.ray.app import deployment_options, ingress_settings
from adaptive_quant.serving.ray.replica import VariantReplica
from adaptive_quant.serving.settings import load_settings
from gateway_process import free_port
from gateway_repo import build_repo, images

# ----------------------------------------------------------------------------- coalescer


class RecordingSender:
    """Answers each call with x * 2 after `gate` opens, and records the batch sizes it got."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = asyncio.Event()

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(x.shape[0])
        await self.gate.wait()
        return x * 2


def test_requests_arriving_while_a_call_is_in_flight_go_together_in_the_next_call_and_each_gets_its_own_rows():
    async def scenario() -> tuple[list[int], list[np.ndarray]]:
        sender = RecordingSender()
        coalescer = CallCoalescer(sender, max_batch_size=32, limit=lambda: 1)
        first = asyncio.ensure_future(coalescer.submit(np.full((1, 2), 1.0)))
        await asyncio.sleep(0)  # the first call is sent alone, at once
        rest = [asyncio.ensure_future(coalescer.submit(np.full((n, 2), float(n)))) for n in (2, 3, 4)]
        await asyncio.sleep(0)
        sender.gate.set()
        answers = await asyncio.gather(first, *rest)
        return sender.sizes, answers

    sizes, answers = asyncio.run(scenario())
    assert sizes == [1, 9]  # one call alone, then the three waiting requests in one call
    for n, answer in zip((1, 2, 3, 4), answers, strict=True):
        assert answer.shape == (n, 2) and np.all(answer == 2.0 * n)


def test_a_call_never_carries_more_than_max_batch_size_samples_of_several_requests():
    async def scenario() -> list[int]:
        sender = RecordingSender()
        coalescer = CallCoalescer(sender, max_batch_size=4, limit=lambda: 1)
        busy = asyncio.ensure_future(coalescer.submit(np.zeros((1, 2))))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(coalescer.submit(np.zeros((3, 2)))) for _ in range(3)]
        await asyncio.sleep(0)
        sender.gate.set()
        await asyncio.gather(busy, *waiting)
        return sender.sizes

    assert asyncio.run(scenario()) == [1, 3, 3, 3]


def test_a_failed_call_fails_every_request_in_it_and_a_request_whose_caller_gave_up_is_never_sent():
    async def scenario() -> tuple[list[int], list[object]]:
        sizes: list[int] = []
        gate = asyncio.Event()

        async def failing(x: np.ndarray) -> np.ndarray:
            sizes.append(x.shape[0])
            await gate.wait()
            raise RuntimeError("replica died")

        coalescer = CallCoalescer(failing, max_batch_size=32, limit=lambda: 1)
        first = asyncio.ensure_future(coalescer.submit(np.zeros((1, 2))))
        await asyncio.sleep(0)
        abandoned = asyncio.ensure_future(coalescer.submit(np.zeros((5, 2))))
        kept = asyncio.ensure_future(coalescer.submit(np.zeros((2, 2))))
        await asyncio.sleep(0)
        abandoned.cancel()  # the gateway's deadline passed while it waited
        gate.set()
        results = await asyncio.gather(first, kept, return_exceptions=True)
        return sizes, results

    sizes, results = asyncio.run(scenario())
    assert sizes == [1, 2]  # the abandoned 5 samples were not sent
    assert all(isinstance(r, RuntimeError) and "replica died" in str(r) for r in results)


# ----------------------------------------------------------------------------- latency model


def _profile(ms: float) -> LatencyProfile:
    return LatencyProfile(
        host={}, batches={"1": LatencyPoint(ms, ms, 1000 / ms), "32": LatencyPoint(ms * 8, ms * 8, 4000 / ms)}
    )


def test_the_queue_estimate_sees_what_other_gateways_queued_on_the_replicas_and_divides_it_among_them():
    est = LatencyEstimator({"int8": _profile(2.0)}, LatencyConfig(compute_slots=0, max_batch_size=32))
    idle = est.estimate_ms("int8", 1)
    est.set_replicas("int8", replicas=1, queued=64)  # other ingress replicas' work, reported by the replicas
    one_replica = est.estimate_ms("int8", 1)
    est.set_replicas("int8", replicas=4, queued=64)
    four_replicas = est.estimate_ms("int8", 1)
    assert idle < four_replicas < one_replica
    assert one_replica == pytest.approx(2.0 + 2 * 16.0)  # 64 samples = 2 full batches of 16 ms before ours
    assert four_replicas == pytest.approx(2.0 + 16.0)  # 16 each: one batch
    assert est.snapshot("int8")["replicas"] == 4


# ----------------------------------------------------------------------------- variant replica


def _session_logits(path: str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], {"images": x})[0]


def test_a_variant_replica_answers_each_version_a_caller_names_with_that_versions_model(tmp_path):
    repo = build_repo(tmp_path / "repo")
    staged = build_repo(tmp_path / "staged")
    n, _ = add_serving_version(staged, repo)
    assert n == 2
    x = np.ascontiguousarray(images(3).transpose(0, 3, 1, 2), dtype=np.float32) / 255.0  # (3, 3, 32, 32)

    async def scenario():
        replica = VariantReplica(str(repo), "int8", {"max_batch_size": 8, "instances": 1}, keep_versions=1)
        await replica.reconfigure({"versions": [1]})
        v1 = await replica.infer(1, x)
        v2 = await replica.infer(2, x)  # not preloaded: loaded on first use, version 1 unloaded (keep 1)
        loaded = replica.loaded_versions()
        with pytest.raises(VariantUnavailable) as missing:
            await replica.infer(7, x)
        return v1, v2, loaded, missing.value

    (logits1, queued, replica_id, node), (logits2, *_), loaded, missing = asyncio.run(scenario())
    manifest = load_manifest(repo)
    expected = _session_logits(str(repo / manifest.variants["int8"].path), x)
    assert logits1.shape == (3, 10) and np.allclose(logits1, expected, atol=1e-5)
    assert np.allclose(logits2, expected, atol=1e-5)  # the staged copy holds the same network
    assert queued == 0 and (replica_id, node) == ("local", "local")
    assert loaded == [2]
    assert "version 7" in str(missing)


def test_a_variant_replica_refuses_a_damaged_file_with_the_reason(tmp_path):
    repo = build_repo(tmp_path / "repo")
    manifest = load_manifest(repo)
    (repo / manifest.variants["fp32"].path).write_bytes(b"not an onnx file")

    async def scenario():
        replica = VariantReplica(str(repo), "fp32", {"instances": 1})
        with pytest.raises(VariantUnavailable) as err:
            await replica.infer(1, np.zeros((1, 3, 32, 32), np.float32))
        return str(err.value)

    message = asyncio.run(scenario())
    assert "fp32" in message and "sha256" in message


# ----------------------------------------------------------------------------- settings and CLI


def test_ray_settings_give_each_variant_its_replicas_and_refuse_min_above_max(tmp_path):
    s = load_settings(
        overrides={
            "ray.variants": {"int8": {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 2}},
            "ray.default_variant.num_cpus": 0.5,
        },
        environ={},
    )
    int8 = deployment_options(s.ray.scaling("int8"), s, deployment_name("int8"))
    fp32 = deployment_options(s.ray.scaling("fp32"), s, deployment_name("fp32"))
    assert int8["name"] == "variant-int8"
    assert int8["autoscaling_config"]["min_replicas"] == 2 and int8["autoscaling_config"]["max_replicas"] == 8
    assert "num_replicas" not in int8
    assert fp32["num_replicas"] == 1 and fp32["ray_actor_options"] == {"num_cpus": 0.5}
    assert int8["max_surge_percent"] == s.ray.max_surge_percent > 0
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={"ray.ingress": {"min_replicas": 3, "max_replicas": 2}}, environ={})
    assert "min_replicas" in str(err.value)


def test_the_ingress_serves_through_the_ray_backend_with_independent_variant_queues(tmp_path):
    s = ingress_settings(load_settings(overrides={"repository": str(build_repo(tmp_path / "r"))}, environ={}))
    assert s.backend.kind == "ray" and s.latency.compute_slots == 0
    assert s.rollout.follow is False  # roll-outs arrive as application updates
    assert s.server.grpc_port == 0 and s.server.workers == 1


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--grpc-port", "8081"], "grpc_port"),
        (["--backend", "triton"], "embedded"),
        (["--workers", "4"], "ray.ingress"),
    ],
)
def test_engine_ray_refuses_what_it_cannot_serve_before_any_cluster_starts(tmp_path, capsys, flags, says):
    repo = build_repo(tmp_path / "r")
    code = serve_main(["--config", "", "--repository", str(repo), "--engine", "ray", *flags])
    assert code == 2
    assert says in capsys.readouterr().err


def test_backend_ray_without_the_ray_engine_is_refused_with_the_command_that_serves_on_ray(tmp_path, capsys):
    repo = build_repo(tmp_path / "r")
    code = serve_main(["--config", "", "--repository", str(repo), "--set", "backend.kind=ray"])
    assert code == 2
    assert "aq-serve --engine ray" in capsys.readouterr().err


def test_an_unreachable_cluster_address_fails_at_once_with_what_to_do(tmp_path, caplog):
    repo = build_repo(tmp_path / "r")
    port = free_port()  # nothing listens there
    code = serve_main(
        ["--config", "", "--repository", str(repo), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]
    )
    assert code == 1
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in caplog.text and "ray start --head" in caplog.text
