"""Helpers for tests that run the gateway as a real process: a free port, waiting until the process
answers (or failing with its output when it exits first), a client that keeps sending, and stopping."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float = 90, path: str = "/readyz") -> None:
    """Until GET url+path answers 200; fails with the process's output if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the gateway exited ({proc.returncode}): {out}{err}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become ready"
        time.sleep(0.1)


class Traffic:
    """Classify requests with a budget from a thread, one after another, until the `with` block
    ends: (status, X-Model-Version) of each, (0, None) when no answer came."""

    def __init__(self, url: str, body: dict, budget_ms: float = 1000, pause_s: float = 0.005) -> None:
        self.url, self.body, self.budget_ms, self.pause_s = url, body, budget_ms, pause_s
        self.stop = threading.Event()
        self.seen: list[tuple[int, str | None]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(
                        "/v1/classify", json=self.body, headers={"X-Latency-Budget-Ms": f"{self.budget_ms:g}"}
                    )
                except httpx.HTTPError:
                    self.seen.append((0, None))  # no answer at all: the assertion on statuses says so
                    continue
                self.seen.append((r.status_code, r.headers.get("X-Model-Version")))
                time.sleep(self.pause_s)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 40 s."""
    proc.terminate()
    try:
        proc.wait(40)
    finally:
        proc.kill()
