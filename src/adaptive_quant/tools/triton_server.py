"""A local `tritonserver` (the binary nvidia-pytriton ships) as a child process: start, wait, stop.

What it takes to run that binary here (docs/platform.md), done in one place:
- a backend directory holding the python backend *and* the stub built for this interpreter's
  Python version (the package keeps stubs per version aside; pytriton copies one in the same way);
- LD_LIBRARY_PATH with the interpreter's LIBDIR (the stub embeds libpython) and the
  `nvidia_pytriton.libs` folder (the server's own shared libraries);
- this environment's `bin` first on PATH, so the stub runs the Python that has onnxruntime.

The server binds to 127.0.0.1 only, runs in its own process group (so its stub processes go
with it), and uses its own shared-memory prefix (so a killed server's regions can be removed).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_CONTROL_MODES = ("none", "explicit", "poll")


class TritonNotInstalled(RuntimeError):
    """The nvidia-pytriton package (which carries the tritonserver binary) is not installed."""


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time; the message carries its log tail."""


@dataclass(frozen=True)
class TritonDistribution:
    binary: Path  # .../pytriton/tritonserver/bin/tritonserver
    python_backend: Path  # .../backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path  # the triton_python_backend_stub for this interpreter's Python version
    libs: Path  # .../nvidia_pytriton.libs


def find_distribution() -> TritonDistribution:
    """Locate the tritonserver that nvidia-pytriton installed, or raise TritonNotInstalled."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):  # a broken or blocked install
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(
            "tritonserver comes with the nvidia-pytriton package, which is not installed in this environment "
            f"({sys.executable}); install it with: pip install nvidia-pytriton==0.7.0 (it is pinned in requirements.txt)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonDistribution(
        binary=dist / "bin" / "tritonserver",
        python_backend=dist / "backends" / "python",
        stub=dist / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=root.parent / "nvidia_pytriton.libs",
    )
    for what, path in (
        ("tritonserver binary", found.binary),
        ("python backend", found.python_backend),
        (f"python backend stub for Python {version}", found.stub),
        ("server libraries", found.libs),
    ):
        if not path.exists():
            raise TritonNotInstalled(f"nvidia-pytriton is installed at {root} but its {what} ({path}) is missing")
    return found


def prepare_backends(dist: TritonDistribution, workdir: Path) -> Path:
    """<workdir>/backends/python with the backend library and this Python's stub; returns <workdir>/backends."""
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in dist.python_backend.iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    shutil.copy2(dist.stub, target / "triton_python_backend_stub")
    return target.parent


def server_env(dist: TritonDistribution, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: libpython + bundled libraries on LD_LIBRARY_PATH, our bin first on PATH."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    ld = [libdir, str(dist.libs)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # the stubs' ORT sessions set their own thread counts
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TritonServerConfig:
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"  # loopback only: this is a developer's and CI's server
    model_control: str = "none"  # none (load all at start) | explicit (load/unload by API) | poll
    load_models: list[str] = field(default_factory=list)  # explicit: loaded at start ("*" = every model)
    exit_timeout_s: int = 5  # s Triton waits for in-flight requests on stop (its own default is 30)
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def explicit(cls, repository: Path, load_models: list[str], exit_timeout_s: int = 5) -> TritonServerConfig:
        """Explicit model control (the gateway loads and unloads), `load_models` loaded at start,
        on three free loopback ports: how the tests and the benchmarks run it."""
        return cls(
            Path(repository),
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            model_control="explicit",
            load_models=list(load_models),
            exit_timeout_s=exit_timeout_s,
        )

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}")
        if self.load_models and self.model_control != "explicit":
            raise ValueError("load_models only applies with model_control='explicit'")


def server_args(cfg: TritonServerConfig, backends: Path, shm_prefix: str) -> list[str]:
    """tritonserver command-line flags for `cfg` (without the binary)."""
    args = [
        f"--model-repository={Path(cfg.repository).resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={cfg.host}",
        f"--http-port={cfg.http_port}",
        f"--grpc-address={cfg.host}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-address={cfg.host}",
        f"--metrics-port={cfg.metrics_port}",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        "--allow-gpu-metrics=false",
        f"--model-control-mode={cfg.model_control}",
        f"--exit-timeout-secs={cfg.exit_timeout_s}",
        f"--log-verbose={cfg.log_verbose}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--strict-readiness=true",
    ]
    args += [f"--load-model={m}" for m in cfg.load_models]
    return args + list(cfg.extra_args)


class LocalTriton:
    """One tritonserver child process. `start()` returns once /v2/health/ready answers 200.

    Usable as a context manager. `kill()` is the crash (SIGKILL) that tests inject; `stop()`
    is the clean stop (SIGTERM, then SIGKILL after the exit timeout + a margin).
    """

    def __init__(self, cfg: TritonServerConfig, workdir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.dist = find_distribution()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="aq-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backends = prepare_backends(self.dist, self.workdir)
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self._shm_prefix = f"aq{os.getpid()}_{id(self) % 100000}_"

    # ------------------------------------------------------------------ addresses

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.cfg.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.metrics_port}/metrics"

    @property
    def command(self) -> list[str]:
        return [str(self.dist.binary), *server_args(self.cfg, self.backends, self._shm_prefix)]

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60.0) -> LocalTriton:
        """Launch and wait until ready; raises TritonStartError with the log tail on failure."""
        if self.running():
            return self
        log.info("starting tritonserver: %s", " ".join(self.command))
        logfile = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=server_env(self.dist),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stubs stop with it
        )
        logfile.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonStartError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                log.info(
                    "tritonserver ready (HTTP %s, gRPC %s, metrics %s)", self.http_url, self.grpc_url, self.metrics_url
                )
                return self
            time.sleep(0.1)
        self.kill()
        raise TritonStartError(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """GET /v2/health/ready answers 200 (every model that should be loaded is)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, wait up to the exit timeout + 5 s, then SIGKILL. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(self.cfg.exit_timeout_s + 5.0 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in time; killing it")
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._reap_group()
        self._remove_shm()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a crash, as tests inject it)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait(10)
        self._reap_group()
        self._remove_shm()

    def close(self) -> None:
        """stop(), and remove the work folder when this object made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # the group this object created (start_new_session)
        except ProcessLookupError:
            pass

    def _reap_group(self) -> None:
        """Python-backend stubs notice their parent is gone within about a second; make sure."""
        assert self.process is not None
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _remove_shm(self) -> None:
        shm = Path("/dev/shm")
        if shm.is_dir():
            for f in shm.glob(f"{self._shm_prefix}*"):
                f.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
