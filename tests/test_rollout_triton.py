"""Two roll-outs end to end over real processes: a REAL Triton (explicit model control), the gateway
with 2 workers on it, aq-rollout, and a client that keeps sending. A re-saved copy is promoted and a
permuted-class copy is rolled back by the canary's mirrored agreement; no request fails, every
answer names its version, and Triton holds only the serving version at the end.

The staged copies are made by tools/staged_copy.py, the same tool scripts/bench_rollout.py uses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="needs nvidia-pytriton (pinned in requirements.txt)")

import tritonclient.grpc as grpcclient  # noqa: E402

from adaptive_quant.cli import rollout  # noqa: E402
from adaptive_quant.core.versions import VersionState, read_index  # noqa: E402
from adaptive_quant.export.triton_python import served_model_names, write_python_flavor  # noqa: E402
from adaptive_quant.tools.staged_copy import make_staged_copy  # noqa: E402
from adaptive_quant.tools.triton_server import LocalTriton, TritonServerConfig  # noqa: E402
from gateway_process import Traffic, free_port, stop_process, wait_ready  # noqa: E402
from gateway_repo import b64_instance, build_repo, images  # noqa: E402


def ready_versions(client: grpcclient.InferenceServerClient, model: str) -> set[str]:
    return {m.version for m in client.get_model_repository_index().models if m.name == model and m.state == "READY"}


def test_promote_then_roll_back_on_triton_with_two_gateway_workers(tmp_path: Path) -> None:
    source = build_repo(tmp_path / "source")
    serving = write_python_flavor(source, tmp_path / "serving")
    good = make_staged_copy(source, tmp_path / "staged_good")
    assert (
        good.variants["int8"].sha256
        != make_staged_copy(source, tmp_path / "staged_wrong", permute_seed=1).variants["int8"].sha256
    )
    cfg = TritonServerConfig.explicit(serving, served_model_names(serving), exit_timeout_s=1)
    triton = LocalTriton(cfg, workdir=tmp_path / "triton").start(timeout_s=90)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(serving), "--port", str(port)]
    cmd += ["--workers", "2", "--backend", "triton", "--triton-url", triton.grpc_url]
    cmd += ["--set", "backend.model_control=explicit", "--set", "rollout.poll_s=0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    args = ["--gateway", url, "--canary-share", "0.3", "--mirror-share", "0.5", "--canary-seconds", "5"]
    args += ["--min-requests", "10", "--min-mirrored", "10", "--no-mlflow"]
    try:
        wait_ready(proc, url, timeout_s=120)
        with Traffic(url, {"instances": [b64_instance(images(1, seed=5)[0])]}, budget_ms=2000, pause_s=0.01) as traffic:
            time.sleep(1)
            assert rollout.main([str(tmp_path / "staged_good"), "--repository", str(serving), *args]) == 0
            time.sleep(1.5)  # every worker switches within rollout.poll_s
            promoted_at = len(traffic.seen)
            assert rollout.main([str(tmp_path / "staged_wrong"), "--repository", str(serving), *args]) == 1
            time.sleep(4)  # the retired versions leave Triton once no call reached them for 2 s
        statuses = {s for s, _ in traffic.seen}
        assert statuses == {200}, statuses
        assert {v for _, v in traffic.seen[:10]} == {"1"}
        assert {v for _, v in traffic.seen[-10:]} == {"2"}
        assert "3" in {v for _, v in traffic.seen[promoted_at:]}  # the canary took its share first
        index = read_index(serving)
        assert index.serving == 2 and index.versions[3].state == VersionState.FAILED
        assert "agreement" in index.versions[3].detail
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        deadline = time.time() + 20
        while time.time() < deadline and ready_versions(client, "tiny_int8") != {"2"}:
            time.sleep(0.5)
        assert ready_versions(client, "tiny_int8") == {"2"}  # versions 1 (retired) and 3 (failed) unloaded
    finally:
        try:
            stop_process(proc)
        finally:
            triton.stop()
