"""The classify engine: one model of a request, over one served model version.

A request is an entry pass, then zero or more follow-up passes, then one combined answer:
  1. entry pass (entry.py): every sample answered once, by the variant the model's entry policy
     picks, with the deadline and fallback rules there; only this pass can fail a request (503)
  2. follow-ups (followup.py), when the model has a router: the router predictor reads the
     entry logits, the planner picks a plan per sample within the remaining budget (priced
     higher under load), the passes run batched and are cut at the deadline; the answer
     averages the passes that ran. A model without a router (single-stage) plans none.
A request picks its model version once (versions.VersionSet.pick: the serving version, or the
canary with its share) and is served wholly by it, on that version's own backend, while
`set_versions` (the roll-out's follower) or `set_model` swaps versions for the requests that
start after it. A request served by the serving version may be mirrored onto the canary
(mirror.py) after its entry pass, in the background.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.stats import softmax
from adaptive_quant.serving.backends.base import Backend
from adaptive_quant.serving.calls import VariantCalls
from adaptive_quant.serving.entry import EntryPass, RequestState
from adaptive_quant.serving.followup import followup_priority, highest_precision
from adaptive_quant.serving.memory_control import MemoryController
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.mirror import Mirrors
from adaptive_quant.serving.model import ServedModel
from adaptive_quant.serving.options import ClassifyOptions
from adaptive_quant.serving.settings import ServeSettings
from adaptive_quant.serving.versions import VersionBook, VersionSet
from adaptive_quant.serving.worker_role import WorkerRole


@dataclass
class ClassifyResult:
    probs: np.ndarray  # (N, num_classes) float32: softmax of the answer (averaged over the passes that ran)
    variants: list[str]  # (N,) key of the variant that answered each sample's entry pass
    passes: list[list[str]]  # (N,) the passes that answered each sample, entry first ("int8", "int8:hflip")
    precisions: list[str]  # (N,) the highest precision among each sample's passes
    classes: list[str]  # (C,) class names of the model version that answered: the columns of probs
    version: int  # the model version that answered (X-Model-Version, v2 model_version)
    budget_met: bool
    server_time_ms: float
    routing_time_ms: float
    fallbacks: int
    followups: int = 0  # samples that got at least one follow-up pass answered
    followups_lost: int = 0  # follow-up passes cut at the deadline or failed


class ClassifierService:
    """Serves requests with the live model versions, each on its own backend; built by factory.build_service."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: GatewayMetrics,
        model: ServedModel,
        *,
        worker: WorkerRole | None = None,
        memory_controller: MemoryController | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.worker = worker  # one of several gateway processes (serving/workers.py), or None
        self.memory_controller = memory_controller  # the memory policy (memory.enabled, worker 0), or None
        self.started_at = time.monotonic()
        self.in_flight = 0  # requests in flight; the dataplane counts them
        self._calls = VariantCalls(metrics)
        self._entry = EntryPass(metrics, self._calls, settings.deadline)
        self.mirrors = Mirrors(
            metrics, self._calls, settings.rollout.mirror_max_in_flight, settings.deadline.no_budget_timeout_ms
        )
        self.versions = VersionSet(model)
        self.book = VersionBook(metrics)  # every version this worker held (/v1/status "versions")
        self.set_model(model)

    def set_model(self, model: ServedModel) -> None:
        """Serve the requests that start from now on with `model` alone; those in flight finish on theirs."""
        self.set_versions(VersionSet(model))

    def set_versions(self, versions: VersionSet) -> None:
        """Serve the requests that start from now on with `versions` (one reference swap, between
        requests); those in flight finish on the version they picked."""
        for model in versions.live():
            self._declare(model)
        self.versions = versions

    def _declare(self, model: ServedModel) -> None:
        self.metrics.declare_variants(model.keys)
        self.metrics.declare_version(model.label)
        if model.followup is not None:  # zeros per plan, after the main router's entry and the cheap one
            self.metrics.declare_plans(
                [p.name for p in model.followup.plans[1:]], entry=(model.manifest.router or {}).get("entry")
            )
        if model.speed_followup is not None and model.cheap_entry is not None:
            cheap = model.keys[model.cheap_entry.column]
            self.metrics.declare_plans([p.name for p in model.speed_followup.plans[1:]], entry=cheap)
        # an idle backend may compute on the event loop only while this is the one request in
        # flight; a mirror counts as another (it must not hold the loop while requests arrive)
        model.backend.set_contention_probe(lambda: self.in_flight > 1 or self.mirrors.in_flight > 0)
        model.backend.set_replica_listener(model.estimator.set_replicas)  # replicas' queues (Ray Serve)

    @property
    def model(self) -> ServedModel:
        """The serving version (status, probes, the memory policy); a request picks with `pick`."""
        return self.versions.serving

    @property
    def backend(self) -> Backend:
        """The serving version's backend."""
        return self.versions.serving.backend

    def pick(self) -> ServedModel:
        """The version a request is served by: the canary with its share, else the serving one."""
        return self.versions.pick()

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def keys(self) -> list[str]:
        return self.model.keys

    # ------------------------------------------------------------------ health

    def ready(self) -> bool:
        """At least one variant the current model routes to is healthy."""
        health = self.backend.variants()
        return any(health[k].healthy for k in self.model.keys)

    def routable(self) -> np.ndarray:
        """(V,) bool over the current model's keys: healthy at start-up and not taken out by the breaker."""
        return self.model.routable(self.backend.variants(), time.monotonic())

    def check_options(self, options: ClassifyOptions) -> None:
        """Raises InputError for options the current model cannot honour (model.ServedModel.check_options)."""
        self.model.check_options(options)

    # ------------------------------------------------------------------ classify

    async def classify(
        self, x: np.ndarray, options: ClassifyOptions, started: float, model: ServedModel | None = None
    ) -> ClassifyResult:
        """x (N, 3, H, W) float32, the model input; `started` perf_counter() s at arrival.
        `model`: the version the caller picked (the dataplane, which counts it in flight); None:
        picked and counted here."""
        if model is None:
            model = self.pick()
            model.usage.in_flight += 1
            try:
                return await self._classify(x, options, started, model)
            finally:
                model.usage.in_flight -= 1
        return await self._classify(x, options, started, model)

    async def _classify(
        self, x: np.ndarray, options: ClassifyOptions, started: float, model: ServedModel
    ) -> ClassifyResult:
        model.check_options(options)  # every pass of this request runs on this version
        n = x.shape[0]
        state = RequestState(
            model=model,
            x=x,
            options=options,
            started=started,
            logits=np.empty((n, model.num_classes), dtype=np.float32),
            answered_by=np.full(n, -1),
            decision_met=np.ones(n, dtype=bool),
        )
        await self._entry.serve(state, np.arange(n), frozenset())
        versions = self.versions
        if versions.canary is not None:
            self.mirrors.maybe_mirror(versions, model, x, state.logits, state.answered_by)
        variants = [model.keys[j] for j in state.answered_by]
        passes = [[k] for k in variants]
        probs = softmax(state.logits)
        followups = lost = 0
        if model.followup is not None and options.variant is None:  # a pinned variant answers alone
            followups, lost = await self._follow_up(state, probs, passes)
        self.metrics.decision_time.observe(state.routing_s)
        server_ms = (time.perf_counter() - started) * 1e3
        met = bool(state.decision_met.all())
        if options.budget_ms is not None:
            met = met and server_ms <= options.budget_ms
        return ClassifyResult(
            probs=probs,
            variants=variants,
            passes=passes,
            precisions=[highest_precision(p, model.precision_of).value for p in passes],
            classes=model.manifest.classes,
            version=model.version,
            budget_met=met,
            server_time_ms=server_ms,
            routing_time_ms=state.routing_s * 1e3,
            fallbacks=state.fallbacks,
            followups=followups,
            followups_lost=lost,
        )

    async def _follow_up(self, state: RequestState, probs: np.ndarray, passes: list[list[str]]) -> tuple[int, int]:
        """The follow-ups, per entry variant (one, unless a fallback or the cheap entry moved some
        samples): plan with the stage whose router was fitted after that variant (model.stage_for),
        run, and write the combined answer into `probs` and `passes` in place.
        Returns (samples upgraded, follow-up passes lost to the deadline or a failure)."""
        model, options = state.model, state.options
        routable = dict(zip(model.keys, model.routable(model.backend.variants(), time.monotonic()).tolist()))
        dl = self.settings.deadline
        reserve_ms = max(dl.followup_reserve_ms, dl.followup_reserve_share * (options.budget_ms or 0.0))
        deadline = None if options.budget_ms is None else state.started + (options.budget_ms - reserve_ms) / 1e3
        upgraded = lost = 0
        for j in np.unique(state.answered_by):
            entry = model.keys[int(j)]
            stage = model.stage_for(entry)
            if stage is None:
                continue
            idx = np.flatnonzero(state.answered_by == j)
            t = time.perf_counter()
            allowed = stage.allowed(entry, routable, options.floor)
            remaining = state.remaining_ms()
            cheap = stage is model.speed_followup
            decision = stage.decide(
                entry,
                state.logits[idx],
                allowed,
                None if remaining is None else remaining - reserve_ms,
                followup_priority(options.priority, cheap, self.settings.planner),
                model.estimator,
            )
            state.routing_s += time.perf_counter() - t
            if not (decision.index > 0).any():
                continue
            result = await stage.run(
                entry,
                state.x[idx],
                state.logits[idx],
                decision,
                deadline,
                dl.no_budget_timeout_ms,
                functools.partial(self._calls.infer, model),
            )
            probs[idx] = result.probs
            for i, p in zip(idx, result.passes):
                passes[i] = p
            for plan in set(result.plans) - {"none"}:
                self.metrics.followups.labels(plan).inc(result.plans.count(plan))
                self.metrics.entry_followups.labels(entry, plan).inc(result.plans.count(plan))
            if result.cut:
                self.metrics.followup_passes_lost.labels("cut").inc(result.cut)
            if result.failed:
                self.metrics.followup_passes_lost.labels("failed").inc(result.failed)
            upgraded += sum(len(p) > 1 for p in result.passes)
            lost += result.cut + result.failed
        return upgraded, lost
