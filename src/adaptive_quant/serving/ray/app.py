"""The gateway as a Ray Serve application: an ingress deployment over one deployment per variant.

    gateway            the whole gateway app (fronts, dataplane, service, router, planner) per
                       replica, stateless; its backend is backends/ray.RayBackend
    variant-<key>      one per routed variant (variant-int8, variant-fp32, ...): ONNX Runtime
                       sessions behind the project's batcher (replica.py), scaled on their own

`build_application(settings, live)` is what `aq-serve --engine ray` deploys; `build_app(args)` is
the same for `serve run` / a KubeRay RayService (`import_path:
adaptive_quant.serving.ray.app:build_app`, args {config, repository, set}).

A roll-out is an application update. The variant deployments get the live versions as their
user_config (loaded in place, no restart); the ingress gets them as an init argument, so its
replicas are replaced, `max_surge_percent` of them started before the old ones stop: an old
replica serves its version until it drains, a new one serves the new version from its first
request, and each request is answered by one version throughout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adaptive_quant.core.manifest import Manifest
from adaptive_quant.core.versions import load_version_manifest, read_index
from adaptive_quant.serving.backends.ray import deployment_name
from adaptive_quant.serving.factory import backend_options
from adaptive_quant.serving.model import routed_keys
from adaptive_quant.serving.settings import RayScaling, ServeSettings, load_settings

log = logging.getLogger(__name__)

INGRESS_NAME = "gateway"


def ingress_settings(settings: ServeSettings) -> ServeSettings:
    """The settings each ingress replica serves with: the Ray backend; variants with replicas of
    their own (independent queues, compute_slots 0); one process per replica; versions followed
    by application updates (the driver's), not by each replica polling versions.json."""
    return settings.model_copy(
        update={
            "repository": str(Path(settings.repository).resolve()),
            "backend": settings.backend.model_copy(update={"kind": "ray"}),
            "latency": settings.latency.model_copy(update={"compute_slots": 0}),
            "server": settings.server.model_copy(update={"workers": 1, "grpc_port": 0}),
            "rollout": settings.rollout.model_copy(update={"follow": False}),
        }
    )


def live_versions(repository: str | Path) -> list[int]:
    """The versions that take traffic now (versions.json: serving, and the canary if any)."""
    return read_index(repository).live()


class GatewayIngress:
    """The ingress deployment's class: `__serve_build_asgi_app__` builds the gateway app in the
    replica (after __init__), whose lifespan Serve runs: backend start, warm-up, profiles."""

    def __init__(self, settings: ServeSettings, live: list[int], variants: dict[str, Any]) -> None:
        # live: the versions this deployment was made for (a change replaces the replicas);
        # variants: the variant deployments' handles, bound so that Serve deploys them with this
        # application; each version's RayBackend finds them by name
        self.settings = settings
        self.live = live
        self.variants = variants

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - an ASGI app
        from adaptive_quant.serving.app import create_app

        return create_app(self.settings)


def deployment_options(scaling: RayScaling, settings: ServeSettings, name: str) -> dict[str, Any]:
    """`Deployment.options(...)` for one deployment: replicas or autoscaling, CPUs, surge, drain."""
    ray = settings.ray
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": scaling.num_cpus},
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "max_surge_percent": ray.max_surge_percent,
        "graceful_shutdown_timeout_s": settings.server.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if scaling.max_replicas_per_node:
        options["max_replicas_per_node"] = scaling.max_replicas_per_node
    if scaling.autoscaled():
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": ray.upscale_delay_s,
            "downscale_delay_s": ray.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 5.0,
        }
    else:
        options["num_replicas"] = scaling.min_replicas
    return options


def build_application(settings: ServeSettings, live: list[int] | None = None):  # noqa: ANN201 - a serve Application
    """The Serve application for `settings` and the repository's live versions (read now if not given)."""
    from ray import serve

    from adaptive_quant.serving.ray.replica import VariantReplica

    gateway = ingress_settings(settings)
    live = live if live is not None else live_versions(gateway.repository)
    keys = _routed_union(gateway, live)
    embedded = gateway.backend.model_copy(update={"kind": "embedded"})  # what each variant replica runs
    options = backend_options(gateway.model_copy(update={"backend": embedded}), workers=1)
    # one ORT call at a time per replica: a replica is the unit of parallelism (add replicas)
    options |= {"instances": 1}
    variant_cls = serve.deployment(VariantReplica)
    variants = {
        key: variant_cls.options(
            **deployment_options(gateway.ray.scaling(key), gateway, deployment_name(key)),
            user_config={"versions": live},
        ).bind(gateway.repository, key, options)
        for key in keys
    }
    ingress_cls = serve.deployment(serve.ingress()(GatewayIngress))
    ingress = ingress_cls.options(**deployment_options(gateway.ray.ingress, gateway, INGRESS_NAME))
    return ingress.bind(gateway, live, variants)


def deployment_names(settings: ServeSettings, live: list[int] | None = None) -> list[str]:
    """The deployments `build_application` makes for `settings` and the live versions (default: the
    repository's): the ingress, then one per routed variant. A RayService's serveConfigV2 names these."""
    gateway = ingress_settings(settings)
    live = live if live is not None else live_versions(gateway.repository)
    return [INGRESS_NAME] + [deployment_name(k) for k in _routed_union(gateway, live)]


def _routed_union(settings: ServeSettings, live: list[int]) -> list[str]:
    """Every variant a live version routes to (a canary may route to one the serving version lacks)."""
    keys: list[str] = []
    for version in live:
        manifest: Manifest = load_version_manifest(settings.repository, version)
        keys += [k for k in routed_keys(settings, manifest) if k not in keys]
    return keys


def build_app(args: dict[str, Any]):  # noqa: ANN201 - a serve Application
    """`serve run` / KubeRay entry: args {config: YAML path, repository: path, set: {key: value},
    versions: [N, ...]}. `versions` pins the live versions (default: the repository's versions.json
    when the application is built). On Kubernetes a roll-out is an edit of it in the RayService's
    serveConfigV2: the operator applies the changed config as an application update."""
    overrides = dict(args.get("set") or {})
    if args.get("repository"):
        overrides["repository"] = args["repository"]
    settings = load_settings(args.get("config") or None, overrides)
    versions = args.get("versions")
    return build_application(settings, [int(v) for v in versions] if versions else None)
