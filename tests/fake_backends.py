"""Test doubles around a real backend (fault injection only): each delegates to the real
backend and injects one kind of failure or delay into `infer`."""

from __future__ import annotations

import asyncio

from adaptive_quant.serving.backends.base import Backend, BackendError


class FakeWrappedBackend(Backend):
    """Delegates everything to `inner`; subclasses change `infer`."""

    name = "fake-wrapped"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def variants(self):
        return self.inner.variants()

    def batch_stats(self):
        return self.inner.batch_stats()

    async def infer(self, variant_key, images):
        return await self.inner.infer(variant_key, images)


class FakeFlakyBackend(FakeWrappedBackend):
    """Variants in `fail` raise, variants in `delay_s` stall first; `calls` records every call."""

    name = "fake-flaky"

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.fail: set[str] = set()
        self.delay_s: dict[str, float] = {}
        self.calls: list[str] = []

    async def infer(self, variant_key, images):
        self.calls.append(variant_key)
        if variant_key in self.delay_s:
            await asyncio.sleep(self.delay_s[variant_key])
        if variant_key in self.fail:
            raise BackendError(f"injected failure on {variant_key}")
        return await self.inner.infer(variant_key, images)


class FakeSlowBackend(FakeWrappedBackend):
    """Every call but the first per variant (the start-up warm-up) sleeps `delay_s` first."""

    name = "fake-slow"

    def __init__(self, inner: Backend, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s
        self.warmed: set[str] = set()

    async def infer(self, variant_key, images):
        if variant_key in self.warmed:
            await asyncio.sleep(self.delay_s)
        self.warmed.add(variant_key)
        return await self.inner.infer(variant_key, images)
