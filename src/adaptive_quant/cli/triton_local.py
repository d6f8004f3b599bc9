"""Start a local Triton (the tritonserver binary nvidia-pytriton ships) on a model repository, in one command.

  python scripts/triton_local.py                                  # model_repository → its python flavour, explicit mode
  python scripts/triton_local.py --model-control-mode none        # Triton loads every model itself
  python scripts/triton_local.py --smoke                          # start, one inference per variant, stop (exit code)

A versioned repository (versions.json) is served the same way: every model's config.pbtxt
version_policy says which versions Triton holds side by side, and the gateway pins the version
it serves on every call (explicit mode: it loads a new version, and drops a retired one, through
Triton's repository API).

Bound to 127.0.0.1. Ports: HTTP 8010 (not 8000: the gateway has it), gRPC 8001 (configs/serve.yaml's
backend.triton_url), metrics 8002. The production repository (backend "onnxruntime") is first written
as its Python-backend flavour into <repository>_python (that binary has only the python backend).
Ctrl-C or SIGTERM stops it cleanly within --exit-timeout seconds. Then, in another shell:

  python scripts/serve.py --backend triton --set backend.model_control=explicit
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from adaptive_quant.core.manifest import ManifestError, load_manifest
from adaptive_quant.export.triton_python import live_versions, served_model_names, write_python_flavor
from adaptive_quant.tools.triton_server import (
    LocalTriton,
    TritonNotInstalled,
    TritonServerConfig,
    TritonStartError,
)


def is_python_flavor(repo: Path) -> bool:
    manifest = load_manifest(repo)
    configs = [repo / v.triton_name / "config.pbtxt" for v in manifest.served_variants()]
    return all(c.is_file() and 'backend: "python"' in c.read_text() for c in configs)


def smoke(server: LocalTriton, repo: Path) -> None:
    """One inference of a zero image per served variant of every live version, over gRPC."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from adaptive_quant.core.versions import load_version_manifest

    client = grpcclient.InferenceServerClient(server.grpc_url)
    for n in live_versions(repo):
        m = load_version_manifest(repo, n)
        for v in m.served_variants():
            x = np.zeros((1, 3, m.image_size, m.image_size), np.float32)
            inp = grpcclient.InferInput(m.input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            out = client.infer(v.triton_name, [inp], model_version=str(n)).as_numpy(m.output_name)
            print(f"  {v.triton_name} version {n}: logits {tuple(out.shape)}")
    client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--repository", default="model_repository", help="repository made by scripts/export.py (default: %(default)s)"
    )
    p.add_argument("--python-repository", help="where its python flavour goes (default: <repository>_python)")
    p.add_argument("--http-port", type=int, default=8010)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--model-control-mode",
        choices=["explicit", "none"],
        default="explicit",
        help="explicit: served variants are loaded at start and the gateway may load/unload them (default)",
    )
    p.add_argument(
        "--exit-timeout",
        type=int,
        default=5,
        help="s Triton waits for in-flight requests on stop (default: %(default)s)",
    )
    p.add_argument("--ready-timeout", type=float, default=120.0, help="s to wait for readiness (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="start, infer once per variant, stop")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    repo = Path(args.repository)
    try:
        if not is_python_flavor(repo):
            target = Path(args.python_repository) if args.python_repository else Path(f"{repo.resolve()}_python")
            repo = write_python_flavor(repo, target)
            print(f"python flavour of {args.repository} written to {repo}")
        names = served_model_names(repo)
        if args.model_control_mode == "none":
            strays = [d.name for d in repo.iterdir() if d.is_dir() and not (d / "config.pbtxt").is_file()]
            if strays:  # Triton would try to load them as models, fail, and exit
                print(
                    f"error: {repo} holds folders that are not Triton models ({', '.join(strays)}); "
                    "use --model-control-mode explicit",
                    file=sys.stderr,
                )
                return 2
        cfg = TritonServerConfig(
            repository=repo,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            model_control=args.model_control_mode,
            load_models=names if args.model_control_mode == "explicit" else [],
            exit_timeout_s=args.exit_timeout,
        )
        # a fixed work folder (backends + log) that outlives the run, so the log can be read afterwards
        server = LocalTriton(cfg, workdir=Path(tempfile.gettempdir()) / f"aq-triton-{args.grpc_port}")
    except (ManifestError, FileNotFoundError, ValueError, TritonNotInstalled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def to_interrupt(signum, frame):  # noqa: ANN001, ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, to_interrupt)
    t0 = time.perf_counter()
    try:
        server.start(timeout_s=args.ready_timeout)
        print(
            f"tritonserver ready in {time.perf_counter() - t0:.1f} s ({args.model_control_mode} model control, "
            f"models: {', '.join(names)}; versions: {', '.join(str(n) for n in live_versions(repo))})"
        )
        print(f"  HTTP    http://{server.http_url}\n  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}")
        print(f"  log     {server.log_path}")
        if args.smoke:
            smoke(server, repo)
            return 0
        print("Ctrl-C stops it.")
        while server.running():
            time.sleep(0.5)
        print(
            f"error: tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr
        )
        return 1
    except TritonStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        t1 = time.perf_counter()
        code = server.stop()
        print(f"tritonserver stopped (exit code {code}) in {time.perf_counter() - t1:.1f} s; log: {server.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
