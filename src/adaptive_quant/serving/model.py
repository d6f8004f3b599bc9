"""One served model version: what a request is routed and answered with, as one object.

`ServedModel` holds the version number, the backend its variants run on, the manifest, the
variants this gateway routes to (keys, precisions, ranks in one column order), the single-stage
prior, the router (two-stage follow-ups, or none), the latency estimator and the profiles it
plans with, the entry policy and the variants' breakers. `build_model` makes it whole; nothing
is set on it afterwards but its `usage` counters. A request reads the version set once
(serving/versions.py) and is served wholly by the one version it picked, so two versions serve
side by side, each on its own backend, and a roll-out swaps versions by swapping one reference.

Single-stage is two-stage with no follow-up: both take an entry pass, and only the entry policy
(chosen here, once per model) and whether a follow-up stage exists differ (serving/entry.py).

A manifest with a speed router adds the cheap entry: its variant (a pruned INT8, opt-in, routed
because the speed router names it) and a follow-up stage of its own, planned with the speed
router (fitted on that variant's outputs) and the plans measured after it. It takes no entry pass
but through `cheap_entry` (entry.CheapEntry), and it needs the main two-stage router: without it,
or with its own router unusable, the gateway serves without the cheap entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.prior import PriorAccuracy
from adaptive_quant.serving.backends.base import Backend, VariantHealth
from adaptive_quant.serving.breaker import Breakers
from adaptive_quant.serving.entry import CheapEntry, CheapestEntry, EntryPolicy, PriorRouting
from adaptive_quant.serving.errors import InputError
from adaptive_quant.serving.followup import FollowupStage, LoadedRouter
from adaptive_quant.serving.options import ClassifyOptions
from adaptive_quant.serving.profiling import ProfileInfo
from adaptive_quant.serving.settings import ServeSettings

NOT_PROFILED = ProfileInfo("manifest", "not profiled on this host", {})


@dataclass(eq=False, slots=True)
class Usage:
    """What runs on one version now (this process): a version no longer live is unloaded once
    `busy()` is false (serving/follower.py)."""

    in_flight: int = 0  # requests that picked this version and have not been answered yet
    mirrors: int = 0  # mirrored calls of the serving version's requests running on it (mirror.py)

    def busy(self) -> bool:
        return self.in_flight > 0 or self.mirrors > 0


@dataclass(frozen=True, eq=False, slots=True)
class ServedModel:
    """One version; every per-variant sequence is in the column order of `keys`."""

    version: int  # the repository's version number (versions.json; 1 in a repository without versions)
    backend: Backend  # this version's variants, started; closed when the version is unloaded
    manifest: Manifest
    keys: list[str]  # (V,) the variants routed to
    precisions: list[Precision]  # (V,)
    ranks: np.ndarray  # (V,) int, Precision.rank
    precision_of: dict[str, Precision]
    # (V,) bool: may take the entry pass. False for a second network's variants (followup_only) and
    # for the cheap entry's variant (it enters through `cheap_entry` only): they answer an entry
    # pass only when pinned or when nothing else is left (fallback)
    entry_ok: np.ndarray
    num_classes: int
    prior: PriorAccuracy  # single-stage routing's p(correct | variant), and /v1/status
    estimator: LatencyEstimator  # this version's variants' latency now (profile · observed ratio + queueing)
    profile: ProfileInfo  # which profiles the estimator plans with, and why
    router: LoadedRouter  # what was loaded (or why nothing was), for the log and /v1/status
    followup: FollowupStage | None  # None: single-stage, no follow-up after the entry pass
    entry: EntryPolicy  # how the entry pass picks a variant per sample
    breakers: Breakers
    usage: Usage = field(default_factory=Usage)  # the one mutable member: counters, not state of the model
    # the cheap entry: what was loaded of the speed router (or why nothing was), its follow-up stage
    # and the entry choice; None / None when the model has none (no speed router, or it is unusable)
    speed_router: LoadedRouter | None = None
    speed_followup: FollowupStage | None = None
    cheap_entry: CheapEntry | None = None

    @property
    def label(self) -> str:
        """The version as Prometheus labels and v2 answers carry it ("2")."""
        return str(self.version)

    def stage_for(self, entry: str) -> FollowupStage | None:
        """The follow-up stage of samples that entered on `entry`: the speed router's after the cheap
        entry (fitted on its outputs), the main router's after any other variant."""
        if self.cheap_entry is not None and entry == self.keys[self.cheap_entry.column]:
            return self.speed_followup
        return self.followup

    def routable(self, health: dict[str, VariantHealth], now: float) -> np.ndarray:
        """(V,) bool: the backend says healthy and the breaker has not taken it out (monotonic `now`)."""
        return np.array([health[k].healthy and b.open_until <= now for k, b in zip(self.keys, self.breakers.columns)])

    def check_options(self, options: ClassifyOptions) -> None:
        """A floor above every precision this model offers, or a pinned variant it does not route
        to (or below the floor), is the caller's mistake (InputError, 422)."""
        floor = options.floor
        if floor is not None and not (self.ranks >= floor.rank).any():
            offered = ", ".join(sorted({p.value for p in self.precisions}))
            raise InputError(
                f"X-Min-Precision {floor.value}: this service offers no variant at or above it (offers {offered})"
            )
        v = options.variant
        if v is None:
            return
        if v not in self.precision_of:
            raise InputError(f"variant {v!r} is not served here (served: {', '.join(self.keys)})")
        if floor is not None and self.precision_of[v].rank < floor.rank:
            raise InputError(f"variant {v} is {self.precision_of[v].value}, below the requested floor {floor.value}")


def routed_keys(settings: ServeSettings, manifest: Manifest) -> list[str]:
    """The variants served: pinned to `settings.variants` (benchmarks, a variant taken out by
    config, an opt-in one such as a pruned INT8 network taken in), else every served variant but
    the opt-in ones."""
    return [v.key for v in manifest.routed_variants(settings.variants)]


def variant_estimator(settings: ServeSettings, manifest: Manifest) -> LatencyEstimator:
    """A latency estimator over the routed variants, planning with the manifest's profiles."""
    return LatencyEstimator(
        {k: manifest.variants[k].latency for k in routed_keys(settings, manifest)}, settings.latency
    )


def build_model(
    settings: ServeSettings,
    manifest: Manifest,
    router: LoadedRouter,
    *,
    backend: Backend,
    version: int = 1,
    estimator: LatencyEstimator | None = None,
    profile: ProfileInfo = NOT_PROFILED,
    speed_router: LoadedRouter | None = None,
) -> ServedModel:
    """The whole model version on its started `backend`. `estimator`: one already given this
    host's profiles (profiling.profile_host), else one planning with the manifest's.
    `speed_router`: the cheap entry's router (followup.load_router role "speed"), when loaded."""
    keys = routed_keys(settings, manifest)
    if estimator is None:
        estimator = variant_estimator(settings, manifest)
    elif set(estimator.variants) != set(keys):
        raise ValueError(f"the estimator covers {sorted(estimator.variants)}, the model routes {sorted(keys)}")
    precisions = [Precision(manifest.variants[k].precision) for k in keys]
    ranks = np.array([p.rank for p in precisions])
    prior = PriorAccuracy.from_manifest(manifest)
    predictor = router.predictor
    followup = (
        FollowupStage(predictor, keys, precisions, settings.planner, manifest.plan_accuracies(predictor.plan_names))
        if predictor is not None
        else None
    )
    entry: EntryPolicy = (
        PriorRouting(prior.row(keys), settings.routing)
        if followup is None
        else CheapestEntry.over(keys, ranks, estimator)
    )
    # the cheap entry's variant takes no normal entry pass (but as a last resort), router or not:
    # it is routed because the speed router names it, and the main router never read its outputs
    cheap = manifest.speed_entry()
    entry_ok = np.array([not manifest.variants[k].followup_only and k != cheap for k in keys])
    speed_followup, cheap_entry = None, None
    speed = speed_router.predictor if speed_router is not None else None
    if followup is not None and speed is not None and cheap in keys:
        speed_followup = FollowupStage(
            speed,
            keys,
            precisions,
            settings.planner.for_cheap_entry(),
            manifest.plan_accuracies(speed.plan_names, entry=cheap),
            load_priced=settings.planner.cheap_entry_load_priced,
        )
        cheap_entry = CheapEntry(keys.index(cheap))
    return ServedModel(
        version=version,
        backend=backend,
        manifest=manifest,
        keys=keys,
        precisions=precisions,
        ranks=ranks,
        precision_of=dict(zip(keys, precisions)),
        entry_ok=entry_ok,
        num_classes=len(manifest.classes),
        prior=prior,
        estimator=estimator,
        profile=profile,
        router=router,
        followup=followup,
        entry=entry,
        breakers=Breakers(keys, settings.breaker),
        speed_router=speed_router,
        speed_followup=speed_followup,
        cheap_entry=cheap_entry,
    )
