"""The served model as one object: built whole, swapped atomically, one version per request."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.routing import Priority
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.factory import build_service
from adaptive_quant.serving.followup import LoadedRouter
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.model import build_model
from adaptive_quant.serving.options import ClassifyOptions
from adaptive_quant.serving.settings import load_settings
from gateway_repo import build_repo, images

PLANS = ["none", "int8:hflip", "fp32", "fp32:hflip"]


class FakePlanRouter:
    """Test double for the router predictor: every sample is predicted to gain from int8:hflip."""

    plan_names = PLANS

    def predict(self, entry_logits: np.ndarray) -> np.ndarray:
        return np.tile([0.5, 0.9, 0.5, 0.5], (len(entry_logits), 1))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repo(tmp_path_factory.mktemp("repo"))


def settings_for(repo, **overrides):
    return load_settings(overrides={"repository": str(repo), "latency.ewma_alpha": 0.0, **overrides}, environ={})


def test_a_model_swapped_while_requests_are_in_flight_serves_each_request_wholly_by_one_version(repo):
    """Version A routes every variant (entry int8, then the int8:hflip follow-up); version B only
    fp16, where no plan can run. A request that read A and then B for its follow-up would answer
    ["int8"] alone: every answer must be A's whole shape or B's."""
    manifest = load_manifest(repo)
    x = to_model_input(images(2, seed=3), manifest.mean, manifest.std)  # (2, 3, 32, 32)
    options = ClassifyOptions(budget_ms=None, priority=Priority.BALANCED, floor=None)

    async def main():
        backend = EmbeddedBackend(repo, manifest)  # inline_max_batch 0: every call waits for the batcher
        await backend.start()
        try:
            service = await build_service(
                settings_for(repo), backend, GatewayMetrics(), router_predictor=FakePlanRouter(), manifest=manifest
            )
            model_a = service.model
            model_b = build_model(
                settings_for(repo, variants=["fp16"]), manifest, model_a.router, backend=model_a.backend
            )
            assert model_a.followup is not None and model_b.keys == ["fp16"]

            async def request():  # what the dataplane does around classify
                service.in_flight += 1
                try:
                    return await service.classify(x, options, time.perf_counter())
                finally:
                    service.in_flight -= 1

            before = [asyncio.create_task(request()) for _ in range(12)]
            await asyncio.sleep(0)  # each has read its model and is waiting for its entry pass
            in_flight_at_swap = sum(not t.done() for t in before)
            service.set_model(model_b)
            after = [asyncio.create_task(request()) for _ in range(12)]
            return in_flight_at_swap, await asyncio.gather(*before), await asyncio.gather(*after)
        finally:
            await backend.close()

    in_flight_at_swap, before, after = asyncio.run(main())
    assert in_flight_at_swap > 0
    for r in before:  # started on A, finished on A although B was served meanwhile
        assert r.passes == [["int8", "int8:hflip"]] * 2 and r.followups == 2 and r.precisions == ["int8"] * 2
    for r in after:
        assert r.passes == [["fp16"]] * 2 and r.followups == 0 and r.precisions == ["fp16"] * 2
    assert all(r.classes == manifest.classes for r in before + after)


def test_the_model_is_built_whole_and_cannot_be_changed_afterwards(repo):
    manifest = load_manifest(repo)
    backend = EmbeddedBackend(repo, manifest)  # not started: building a model runs nothing on it
    model = build_model(settings_for(repo), manifest, LoadedRouter(None, "none: single-stage", {}), backend=backend)
    assert model.followup is None and model.keys == [v.key for v in manifest.routed_variants([])]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.keys = ["int8"]  # type: ignore[misc]
