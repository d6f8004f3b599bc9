"""The driver of `aq-serve --engine ray`: join a Ray cluster (or start a local one), deploy the
gateway application (app.py), follow the repository's versions by application updates, and on
SIGTERM/SIGINT drain, delete the application and stop the cluster it started.

    start     ray.init(address) or a local cluster (ray.local_num_cpus, object store, no dashboard)
    deploy    serve.start(HTTP on server.host:port) + serve.run(application), ready when RUNNING
    follow    versions.json polled every rollout.poll_s; a change of the live versions (aq-rollout
              promoted, rolled back, or started a canary) → serve.run(the updated application):
              variant replicas load the new version in place, ingress replicas are replaced with
              max_surge_percent extra started first
    stop      serve.delete (replicas drain their requests, server.drain_timeout_s at most), then
              serve.shutdown + ray.shutdown when the cluster is this process's own

Ray's own logs (replicas, controller, proxy) are in the session's log folder, printed at start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from adaptive_quant.core.versions import index_stamp
from adaptive_quant.serving.ray.app import build_application, live_versions
from adaptive_quant.serving.settings import ServeSettings, usable_cores

log = logging.getLogger(__name__)


# Ray Serve's throughput-optimised mode behind HAProxy (settings: ray.throughput_optimized). The
# drain period is Ray's wait for an external load balancer to deregister a stopping ingress
# replica (30 s); HAProxy on the node learns at once, and SIGTERM must stop all within 60 s
THROUGHPUT_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


class RayEngineError(RuntimeError):
    """The Ray engine cannot start (Ray missing, the cluster unreachable, the application failed)."""


class RayEngine:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.address = settings.ray.address or os.environ.get("RAY_ADDRESS", "")
        self.own_cluster = not self.address  # a local cluster this process starts, and stops
        self.live: list[int] = []
        self._stamp: tuple[int, int, int] | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> float:
        """Cluster, HTTP proxy and the application, RUNNING; returns the seconds it took."""
        t0 = time.perf_counter()
        if self.own_cluster and self.settings.ray.throughput_optimized:
            # read by Ray Serve at import, in every process of the cluster this process starts
            for name, value in THROUGHPUT_ENV.items():
                os.environ.setdefault(name, value)
        try:
            import ray
            from ray import serve
        except ImportError as exc:
            raise RayEngineError(
                f"--engine ray needs Ray Serve, which is not installed ({exc}); "
                'install the extra: pip install -c requirements.txt -e ".[ray]"'
            ) from None
        s = self.settings
        if self.own_cluster:
            cpus = s.ray.local_num_cpus or usable_cores()
            log.info(
                "starting a local Ray cluster: %d CPUs, %d MB object store, no dashboard", cpus, s.ray.object_store_mb
            )
            ray.init(
                address="local",  # a new cluster, even where `ray start` left one (ray.init() would join it)
                num_cpus=cpus,
                include_dashboard=False,
                object_store_memory=s.ray.object_store_mb * 2**20,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            log.info("joining the Ray cluster at %s", self.address)
            unreachable = _unreachable(self.address)
            if unreachable:  # ray.init would retry for minutes before saying so
                raise RayEngineError(
                    f"cannot reach the Ray cluster at {self.address}: {unreachable}; start one there with "
                    "`ray start --head`, or leave --ray-address and RAY_ADDRESS unset for a local cluster"
                )
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except Exception as exc:
                auth = (
                    ""
                    if os.environ.get("RAY_AUTH_MODE")
                    else "; if the cluster uses token authentication (what `ray start` sets up when a token "
                    "exists), set RAY_AUTH_MODE=token and give the token as RAY_AUTH_TOKEN or ~/.ray/auth_token: "
                    "Ray never enables it for an explicit address"
                )
                raise RayEngineError(f"cannot join the Ray cluster at {self.address}: {exc}{auth}") from exc
        log.info("Ray logs (replicas, controller, proxy): %s", _log_dir(ray))
        # ray.init installs handlers of its own that exit at once; ours drain first
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        serve.start(
            http_options={"host": s.server.host, "port": s.server.port},
            proxy_location=s.ray.proxy_location,
        )
        self._stamp = index_stamp(s.repository)
        self.live = live_versions(s.repository)
        self._deploy(self.live, "start")
        return time.perf_counter() - t0

    def _deploy(self, live: list[int], why: str) -> None:
        """serve.run the application for `live`, waiting until it is RUNNING (start_timeout_s)."""
        from ray import serve

        app = build_application(self.settings, live)
        done: dict[str, BaseException | None] = {}

        def run() -> None:
            try:
                serve.run(app, name=self.settings.ray.app_name, route_prefix="/")
                done["error"] = None
            except BaseException as exc:  # DEPLOY_FAILED and friends: reported by the caller
                done["error"] = exc

        t = time.perf_counter()
        worker = threading.Thread(target=run, name="serve-run", daemon=True)
        worker.start()
        deadline = time.monotonic() + self.settings.ray.start_timeout_s
        # in steps: a SIGTERM during a deploy stops waiting for it (the shutdown deletes the application)
        while worker.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            worker.join(0.5)
        if worker.is_alive() and self._stop.is_set():
            log.info("stopping during the deploy (%s, versions %s): not waiting for it", why, live)
            return
        if worker.is_alive():
            raise RayEngineError(
                f"the application was not RUNNING within ray.start_timeout_s={self.settings.ray.start_timeout_s:.0f} s "
                f"({why}, versions {live}); its replicas' logs say why: {_status_line()}"
            )
        if done.get("error") is not None:
            raise RayEngineError(
                f"the application failed to deploy ({why}, versions {live}): {done['error']}; {_status_line()} "
                f"(the replicas' logs: {_log_dir_now()}/serve/)"
            )
        log.info(
            "application %s RUNNING with versions %s (%s, %.1f s)",
            self.settings.ray.app_name,
            live,
            why,
            time.perf_counter() - t,
        )

    def follow(self) -> None:
        """Until stop(): redeploy when the repository's live versions change (a roll-out)."""
        while not self._stop.wait(self.settings.rollout.poll_s):
            if not self.settings.rollout.follow:
                continue
            stamp = index_stamp(self.settings.repository)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                live = live_versions(self.settings.repository)
            except Exception as exc:  # a half-written or broken index: keep serving what serves
                log.error("versions.json cannot be read (%s); still serving versions %s", exc, self.live)
                continue
            if live == self.live:
                continue
            log.info(
                "versions %s → %s: application update (ingress replicas replaced, %d%% surge; variants load in place)",
                self.live,
                live,
                self.settings.ray.max_surge_percent,
            )
            try:
                self._deploy(live, "roll-out")
                self.live = live
            except RayEngineError as exc:
                log.error("%s; the previous replicas keep serving versions %s", exc, self.live)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def shutdown(self) -> float:
        """Delete the application (its replicas drain), stop what this process started; seconds."""
        import ray
        from ray import serve

        t = time.perf_counter()
        if not ray.is_initialized():
            return 0.0
        try:
            log.info("deleting application %s: replicas drain their requests", self.settings.ray.app_name)
            serve.delete(self.settings.ray.app_name)
            if self.own_cluster:
                serve.shutdown()
        except Exception as exc:  # the cluster may be half gone already; still stop what we own
            log.error("stopping Serve failed: %s", exc)
        ray.shutdown()
        log.info(
            "stopped in %.1f s%s",
            time.perf_counter() - t,
            "; the local Ray cluster is down" if self.own_cluster else "",
        )
        return time.perf_counter() - t


def run(settings: ServeSettings) -> int:
    """`aq-serve --engine ray`: serve until SIGTERM/SIGINT, then drain and stop (blocks)."""
    engine = RayEngine(settings)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    signal.signal(signal.SIGINT, lambda *_: engine.stop())
    try:
        took = engine.start()
    except RayEngineError as exc:
        log.error("%s", exc)
        engine.shutdown()
        return 1
    if engine.stopping:  # SIGTERM while starting
        engine.shutdown()
        return 0
    s = settings.server
    print(
        f"ready in {took:.1f} s: http://{s.host}:{s.port} (Ray Serve application {settings.ray.app_name})", flush=True
    )
    engine.follow()
    engine.shutdown()
    return 0


def _unreachable(address: str, timeout_s: float = 5.0) -> str:
    """Why a TCP connection to a GCS address ("host:port") fails, "" when it connects. Other forms
    ("auto", "ray://host:port" for Ray Client, "local") are left to ray.init."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return ""
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed ({exc.strerror or exc})"
    return ""


def _log_dir(ray) -> str:  # noqa: ANN001 - the ray module
    try:
        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:
        return "the session's logs folder (/tmp/ray/session_latest/logs on the head node)"


def _log_dir_now() -> str:
    import ray

    return _log_dir(ray)


def _status_line() -> str:
    try:
        from ray import serve

        apps = serve.status().applications
        return "; ".join(
            f"{d}: {info.status} {info.message[:200]}" for app in apps.values() for d, info in app.deployments.items()
        )
    except Exception as exc:
        return f"(status unavailable: {exc})"
