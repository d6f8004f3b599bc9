"""Several gateway processes on one port: a supervisor and its workers (`server.workers`).

Why: under Poisson arrivals most batches are small and compute inline on the event loop
(backend.inline_max_batch), so one gateway process serves on about one core while the others
wait; one process per core keeps more requests within their budget at the same rate.

How:
- The supervisor (this process) is given the app factory by its caller (cli/serve.py, which has
  checked the settings and the repository), binds the listening socket once, and starts the
  workers one after another (multiprocessing "spawn": a fresh interpreter each, no state forked
  from here). Each worker serves on the inherited socket; the kernel gives every new
  connection to one worker's accept.
- Worker 0 profiles the host at start-up (profiling.py) and writes what it found; the others start
  once it is ready and plan with that file, because two profilers timing at once on the same
  cores would each time the other's load. Starting one at a time also keeps start-up memory flat.
- SIGTERM or SIGINT to the supervisor reaches every worker as one SIGTERM: each stops accepting and
  drains its own requests in flight (server.drain_timeout_s), as a single gateway does. The workers
  run in their own process group, so a terminal's Ctrl-C reaches them only through the supervisor
  (a second signal would make uvicorn give up the drain).
- A worker that dies while serving is logged with its exit status and started again (after 1 s,
  doubling up to 30 s while it keeps dying young). A worker that cannot start at all stops the
  gateway: the error is in its log lines above.
- Prometheus values live in per-process files under a directory of the supervisor's
  (PROMETHEUS_MULTIPROC_DIR, set before the workers start); /metrics on any worker sums them
  (metrics.py). /v1/status is the answering worker's own and says which worker it is.
- The memory policy (Triton model control) runs in worker 0 only: one policy loads and unloads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from adaptive_quant.serving.metrics import MULTIPROC_ENV
from adaptive_quant.serving.server import make_server
from adaptive_quant.serving.settings import ServeSettings, load_settings
from adaptive_quant.serving.worker_role import WorkerRole

log = logging.getLogger(__name__)

READY = "ready"
START_TIMEOUT_S = 300.0  # s a worker may take from spawn to serving (imports, sessions, warm-up, profile)
RESTART_DELAY_S = (1.0, 30.0)  # first and longest wait before starting a dead worker again
LIVED_LONG_S = 60.0  # a worker that served this long before dying restarts after the first delay again
LOG_FORMAT = "%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s"

# (settings, role) → one worker's ASGI app, e.g. create_app(settings, worker=role)
AppFactory = Callable[[ServeSettings, WorkerRole], Any]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a spawned worker needs to build its gateway, picklable: the settings are
    re-read from the same file, overrides and environment, so every worker runs the same ones."""

    role: WorkerRole
    config_path: str | None
    overrides: dict[str, Any]
    log_level: str
    app_factory: AppFactory


def worker_main(spec: WorkerSpec, sock: socket.socket, ready: Connection) -> None:
    """A worker's process: its own gateway (app, backend, event loop) on the shared socket."""
    os.setpgrp()  # Ctrl-C in a terminal reaches the supervisor only, which forwards one SIGTERM
    logging.basicConfig(level=spec.log_level.upper(), format=LOG_FORMAT.format(index=spec.role.index))
    quiet = logging.getLogger("adaptive_quant.serving.settings")
    quiet.setLevel(logging.ERROR)  # its warnings (stray AQ_* variables) were the supervisor's to give, once
    settings = load_settings(spec.config_path, spec.overrides)
    quiet.setLevel(logging.NOTSET)
    app = spec.app_factory(settings, spec.role)
    server = make_server(app, settings)
    server.on_started = lambda: ready.send((READY, os.getpid()))
    server.run(sockets=[sock])


class Supervisor:
    """Starts `count` workers on one socket, restarts those that die, forwards the stop signal."""

    def __init__(
        self,
        settings: ServeSettings,
        config_path: str | None,
        overrides: dict[str, Any],
        count: int,
        app_factory: AppFactory,
    ) -> None:
        """`app_factory(settings, role)` builds one worker's ASGI app (cli/serve.py passes
        `worker_app`); it must be picklable (a module-level function or a partial of one): each
        worker is a fresh interpreter ("spawn")."""
        self.settings = settings
        self.count = count
        self.run_dir = Path(tempfile.mkdtemp(prefix="aq-serve-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.profile_path = self.run_dir / "profile.json"
        self.config_path = config_path
        self.overrides = overrides
        self.app_factory = app_factory
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess | None] = [None] * count
        self.started_at = [0.0] * count
        self.delay = [RESTART_DELAY_S[0]] * count
        self.stopping = False
        self.sock: socket.socket | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and every worker has drained; the exit status (0, or 1 if a
        worker could not start or ended badly during the drain)."""
        os.environ[MULTIPROC_ENV] = str(self.metrics_dir)  # before any worker imports prometheus_client
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.sock = bind(self.settings.server.host, self.settings.server.port)
            if self.settings.server.grpc_port:  # the workers share it (SO_REUSEPORT): nobody else may have it
                check_free(self.settings.server.host, self.settings.server.grpc_port, "server.grpc_port")
            for i in range(self.count):
                if self.stopping or not self._start(i):
                    self._stop_all()
                    return 0 if self.stopping else 1
            log.info(
                "%d workers serving on http://%s:%d (pids %s)",
                self.count,
                self.settings.server.host,
                self.settings.server.port,
                ", ".join(str(p.pid) for p in self.procs if p is not None),
            )
            return self._watch()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.sock is not None:
                self.sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _start(self, i: int) -> bool:
        """Start worker `i` and wait until it serves; False if it died or hung on the way."""
        role = WorkerRole(i, self.count, self.profile_path)
        spec = WorkerSpec(role, self.config_path, self.overrides, self.settings.server.log_level, self.app_factory)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker_main, args=(spec, self.sock, child), name=f"aq-worker-{i}")
        t = time.monotonic()
        proc.start()
        child.close()
        self.procs[i], self.started_at[i] = proc, t
        while time.monotonic() - t < START_TIMEOUT_S and not self.stopping:
            ready = wait([parent, proc.sentinel], timeout=1.0)
            if parent in ready:
                try:
                    msg = parent.recv()
                except EOFError:  # it exited before it could say so: the sentinel tells next round
                    msg = None
                if msg and msg[0] == READY:
                    log.info("worker %d (pid %d) serving after %.1f s", i, proc.pid, time.monotonic() - t)
                    parent.close()
                    return True
            if proc.sentinel in ready or not proc.is_alive():
                proc.join()
                if self.stopping:  # our own SIGTERM reached it while it was starting
                    log.info("worker %d (pid %d) stopped before serving", i, proc.pid)
                    return True
                log.error("worker %d (pid %d) exited with status %s before serving", i, proc.pid, proc.exitcode)
                return False
        if not self.stopping:
            log.error("worker %d (pid %d) did not start within %.0f s; stopping", i, proc.pid, START_TIMEOUT_S)
        parent.close()
        return self.stopping

    def _watch(self) -> int:
        """Until stopped: restart dead workers. Then wait for every worker's drain."""
        while not self.stopping:
            alive = {p.sentinel: i for i, p in enumerate(self.procs) if p is not None}
            for sentinel in wait(list(alive), timeout=1.0):
                i = alive[sentinel]
                proc = self.procs[i]
                assert proc is not None
                proc.join()
                self._forget(proc)
                if self.stopping:
                    break
                lived = time.monotonic() - self.started_at[i]
                self.delay[i] = (
                    RESTART_DELAY_S[0] if lived > LIVED_LONG_S else min(RESTART_DELAY_S[1], self.delay[i] * 2)
                )
                log.error(
                    "worker %d (pid %d) died with status %s after %.0f s; starting it again in %.0f s",
                    i,
                    proc.pid,
                    proc.exitcode,
                    lived,
                    self.delay[i],
                )
                self.procs[i] = None
                self._sleep(self.delay[i])
                if not self.stopping and not self._start(i):
                    self.procs[i] = None
                    if not any(p is not None for p in self.procs):
                        log.error("worker %d could not be started again and no worker is left; stopping", i)
                        return 1
                    log.error("worker %d could not be started again; the others keep serving", i)
        # drain: every worker got SIGTERM in _on_signal
        status = 0 if self._join_all() else 1
        log.info("all workers stopped")
        return status

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            log.info("signal %d again: the workers are already draining", signum)
            return
        self.stopping = True
        log.info("signal %d: each worker stops accepting connections and drains its requests", signum)
        self._signal_all()

    def _signal_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        self._signal_all()
        self._join_all()

    def _join_all(self) -> bool:
        """Wait for the signalled workers: each gets its drain time and a margin, then is killed.
        True when every one ended cleanly (uvicorn re-raises SIGTERM after its drain: -SIGTERM is clean)."""
        deadline = time.monotonic() + self.settings.server.drain_timeout_s + 10.0
        clean = True
        for proc in self.procs:
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker pid %d still running after its drain timeout; killing it", proc.pid)
                proc.kill()
                proc.join()
                clean = False
            elif proc.exitcode not in (0, -signal.SIGTERM):
                clean = False
        return clean

    def _forget(self, proc: multiprocessing.process.BaseProcess) -> None:
        """A dead worker's live gauges (in flight) must not count any more."""
        from prometheus_client import multiprocess

        if proc.pid is not None:
            multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))


def check_free(host: str, port: int, what: str) -> None:
    """OSError naming `what` when another socket already has host:port."""
    _bound(host, port, f"{what}: ").close()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker serves on (IPv4 or IPv6, as `host` resolves)."""
    sock = _bound(host, port, "")
    sock.listen(2048)  # uvicorn's backlog
    sock.set_inheritable(True)
    return sock


def _bound(host: str, port: int, what: str) -> socket.socket:
    """A socket bound to host:port, or OSError "<what>cannot listen on host:port: <why>"."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{what}cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
