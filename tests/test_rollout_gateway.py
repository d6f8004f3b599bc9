"""The gateway follows the repository's versions without a restart (roll-out contract, sections 4
and 5), as a caller sees it: X-Model-Version and v2 model_version on the answers, /v1/status
"versions", the per-version series on /metrics; in-process over HTTP, and with 2 workers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import numpy_helper

from adaptive_quant.core.manifest import load_manifest, save_manifest, sha256_file
from adaptive_quant.core.versions import index_lock, promoted, read_index, utc_now, with_canary, write_index
from adaptive_quant.export.versions import add_serving_version, add_version
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from gateway_process import free_port, stop_process, wait_ready
from gateway_repo import b64_instance, build_repo, images
from http_server import serve_in_thread
from prometheus_scrape import metric

POLL_S = 0.05  # s between the follower's looks at versions.json in these tests


def settings_for(repo: Path, **overrides):
    tree = {"repository": str(repo), "latency.ewma_alpha": 0.0, "rollout.poll_s": POLL_S, **overrides}
    return load_settings(overrides=tree, environ={})


def body(n: int = 1, seed: int = 0) -> dict:
    return {"instances": [b64_instance(img) for img in images(n, seed=seed)]}


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 30.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def permuted_copy(root: Path) -> Path:
    """A repository whose networks run fine and answer a permuted class: the rows of the last
    Gemm (weights and bias) shifted by one class, in every variant (no class keeps its row)."""
    repo = build_repo(root)
    manifest = load_manifest(repo)
    for v in manifest.variants.values():
        path = repo / v.path
        model = onnx.load(path)
        for init in model.graph.initializer:
            if init.name in ("w2", "w2_q", "b2"):
                arr = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(np.roll(arr, 1, axis=0), init.name))
        onnx.save(model, path)
        v.sha256, v.size_bytes = sha256_file(path), path.stat().st_size
    save_manifest(repo, manifest)
    return repo


def start_canary(repo: Path, staged: Path, share: float, mirror_share: float) -> int:
    """Add `staged` as the next version and make it the canary, as aq-rollout does."""
    n, _ = add_version(staged, repo)
    with index_lock(repo):
        write_index(repo, with_canary(read_index(repo), n, share, mirror_share, utc_now()))
    return n


def promote(repo: Path) -> None:
    with index_lock(repo):
        write_index(repo, promoted(read_index(repo), utc_now(), "test"))


def version_states(status: dict) -> dict[int, dict]:
    return {v["version"]: v for v in status["versions"]}


@contextmanager
def gateway(repo: Path, **overrides):
    with TestClient(create_app(settings_for(repo, **overrides))) as client:
        yield client


def holds(client: TestClient, version: int, state: str) -> Callable[[], bool]:
    return lambda: version_states(client.get("/v1/status").json()).get(version, {}).get("state") == state


# ----------------------------------------------------------------------------- switch


def test_a_new_serving_version_is_served_without_a_restart_and_without_a_failed_request(tmp_path):
    repo = build_repo(tmp_path / "serving")
    staged = build_repo(tmp_path / "staged")  # a re-saved copy: same networks, new files
    app = create_app(settings_for(repo))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/v1/classify", json=body())
        assert first.status_code == 200 and first.headers["X-Model-Version"] == "1"
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def keep_sending() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                i = 0
                while not stop.is_set():
                    r = c.post("/v1/classify", json=body(seed=i % 8))
                    answers.append((r.status_code, r.headers.get("X-Model-Version")))
                    i += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_until(lambda: len(answers) > 20, "the client's first answers")
            n, _ = add_serving_version(staged, repo)  # what aq-export into a serving repository does
            assert n == 2
            wait_until(lambda: answers and answers[-1][1] == "2", "X-Model-Version 2")
            after = len(answers)
            wait_until(lambda: len(answers) > after + 20, "more answers on version 2")
        finally:
            stop.set()
            sender.join(20)
        assert {code for code, _ in answers} == {200}  # nothing lost across the switch
        seen = [v for _, v in answers]
        switch = seen.index("2")
        assert set(seen[:switch]) == {"1"} and set(seen[switch:]) == {"2"}  # one switch, never back
        # the old version's backend is closed once nothing is in flight on it
        status = wait_until(
            lambda: (
                (s := client.get("/v1/status").json()) and version_states(s)[1]["detail"].endswith("unloaded") and s
            ),
            "version 1 unloaded",
        )
        states = version_states(status)
        assert status["version"] == 2 and states[2]["state"] == "serving"
        assert states[1]["state"] == "retired" and states[1]["in_flight"] == 0
        assert states[1]["requests"] >= switch and states[2]["requests"] >= len(seen) - switch
        assert metric(client, "aq_model_version_workers", version="2", state="serving") == 1
        assert metric(client, "aq_model_version_workers", version="1", state="serving") == 0
        assert metric(client, "aq_version_requests_total", version="1", outcome="ok") >= switch
        assert client.post("/v1/classify", json=body()).headers["X-Model-Version"] == "2"


# ----------------------------------------------------------------------------- canary and mirrors


def test_a_canary_answers_its_share_each_request_wholly_and_mirrors_catch_a_permuted_network(tmp_path):
    repo = build_repo(tmp_path / "serving")
    wrong = permuted_copy(tmp_path / "permuted")
    with gateway(repo, **{"rollout.mirror_max_in_flight": 64}) as client:  # no mirror skipped
        img = body(n=2, seed=5)
        v1 = [p["class_id"] for p in client.post("/v1/classify", json=img).json()["predictions"]]
        n = start_canary(repo, wrong, share=0.5, mirror_share=1.0)
        wait_until(holds(client, n, "canary"), "version 2 held as the canary")
        versions = []
        for _ in range(40):
            r = client.post("/v1/classify", json=img, headers={"X-Latency-Budget-Ms": "1000"})
            assert r.status_code == 200, r.text
            version = r.headers["X-Model-Version"]
            got = [p["class_id"] for p in r.json()["predictions"]]
            # the permuted network answers class c+1 where the first answers c: both samples
            # were answered by the version the header names, never one by each
            assert got == (v1 if version == "1" else [(c + 1) % 10 for c in v1]), (version, got, v1)
            versions.append(version)
        assert set(versions) == {"1", "2"}  # 2^-39 to fail by chance
        # the v2 protocol names the version that answered; a pinned version answers alone
        meta = client.get("/v2/models/tiny").json()
        assert meta["versions"] == ["1", "2"]
        v2_body = {"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8"}]}
        v2_body["inputs"][0]["data"] = images(1).reshape(-1).tolist()
        for _ in range(6):
            r = client.post("/v2/models/tiny/infer", json=v2_body)
            assert r.status_code == 200 and r.json()["model_version"] == r.headers["X-Model-Version"]
        assert client.post("/v2/models/tiny/versions/2/infer", json=v2_body).json()["model_version"] == "2"
        # every request served by version 1 was mirrored onto the canary, and every mirrored
        # sample disagrees
        served_by_1 = versions.count("1")
        disagree = wait_until(
            lambda: (
                metric(client, "aq_mirror_comparisons_total", version="2", result="disagree") >= 2 * served_by_1
                and metric(client, "aq_mirror_comparisons_total", version="2", result="disagree")
            ),
            "the mirrors counted",
        )
        assert disagree >= 2 * served_by_1
        assert metric(client, "aq_mirror_comparisons_total", version="2", result="agree") == 0
        status = client.get("/v1/status").json()
        assert status["canary"]["version"] == 2 and status["canary"]["mirror_comparisons"]["agree"] == 0
        # per-version series (contract section 4)
        assert metric(client, "aq_version_requests_total", version="2", outcome="ok") > versions.count("2")
        assert metric(client, "aq_version_budget_total", version="2", result="met") == versions.count("2")
        assert metric(client, "aq_model_version_workers", version="2", state="canary") == 1
        assert metric(client, "aq_model_version_workers", version="1", state="serving") == 1


def test_mirrors_agree_for_a_resaved_copy_and_promotion_moves_every_request(tmp_path):
    repo = build_repo(tmp_path / "serving")
    same = build_repo(tmp_path / "resaved")
    with gateway(repo, **{"rollout.mirror_max_in_flight": 64}) as client:  # no mirror skipped
        n = start_canary(repo, same, share=0.0, mirror_share=1.0)
        wait_until(holds(client, n, "canary"), "version 2 held as the canary")
        for i in range(10):
            r = client.post("/v1/classify", json=body(seed=i))
            assert r.status_code == 200 and r.headers["X-Model-Version"] == "1"  # share 0: mirrors only
        agree = wait_until(
            lambda: (
                metric(client, "aq_mirror_comparisons_total", version="2", result="agree") >= 10
                and metric(client, "aq_mirror_comparisons_total", version="2", result="agree")
            ),
            "10 mirrored samples compared",
        )
        assert agree == 10
        assert metric(client, "aq_mirror_comparisons_total", version="2", result="disagree") == 0
        promote(repo)
        wait_until(holds(client, n, "serving"), "version 2 serving")
        for i in range(5):
            assert client.post("/v1/classify", json=body(seed=i)).headers["X-Model-Version"] == "2"
        wait_until(
            lambda: version_states(client.get("/v1/status").json())[1]["detail"].endswith("unloaded"),
            "version 1 unloaded",
        )
        assert metric(client, "aq_model_version_workers", version="2", state="canary") == 0
        assert metric(client, "aq_model_version_workers", version="2", state="serving") == 1


def test_a_version_loaded_while_serving_plans_with_the_host_ratio_of_the_serving_one_not_a_new_timing(tmp_path):
    repo = build_repo(tmp_path / "serving")
    same = build_repo(tmp_path / "resaved")  # same networks, same manifest profiles
    with gateway(repo, **{"profiling.mode": "always", "profiling.budget_s": 0.2}) as client:
        measured = client.get("/v1/status").json()["profile"]
        assert measured["source"] == "measured at start-up"
        n = start_canary(repo, same, share=0.5, mirror_share=0.0)
        wait_until(holds(client, n, "canary"), "version 2 held as the canary")
        promote(repo)
        wait_until(holds(client, n, "serving"), "version 2 serving")
        profile = client.get("/v1/status").json()["profile"]
    assert profile["source"] == "scaled from the serving version's" and "not timed" in profile["reason"]
    for key, p95 in measured["batch1_p95_ms"].items():  # the same networks: the same figures here
        assert profile["batch1_p95_ms"][key]["used"] == pytest.approx(p95["used"], rel=1e-6)


def test_a_version_with_a_corrupt_file_fails_here_and_the_serving_version_keeps_answering(tmp_path):
    repo = build_repo(tmp_path / "serving")
    staged = build_repo(tmp_path / "staged")
    with gateway(repo) as client:
        n, manifest = add_version(staged, repo)
        path = repo / manifest.variants["int8"].path
        path.unlink()  # a new file, not the old one's bytes changed: version 1's may be the same inode
        path.write_bytes(b"not an ONNX model")
        with index_lock(repo):
            write_index(repo, with_canary(read_index(repo), n, 0.5, 0.5, utc_now()))
        wait_until(holds(client, n, "failed"), "version 2 failed")
        status = client.get("/v1/status").json()
        failed = version_states(status)[n]
        assert "int8" in failed["detail"] and status["canary"] is None and status["version"] == 1
        for i in range(10):
            r = client.post("/v1/classify", json=body(seed=i))
            assert r.status_code == 200 and r.headers["X-Model-Version"] == "1"
        assert metric(client, "aq_model_version_workers", version="2", state="failed") == 1
        assert metric(client, "aq_version_requests_total", version="2", outcome="ok") == 0


def test_a_refusal_after_the_version_was_chosen_names_it(tmp_path):
    repo = build_repo(tmp_path / "serving")
    with gateway(repo) as client:
        r = client.post("/v1/classify", json={"instances": []})
        assert r.status_code == 422 and r.headers["X-Model-Version"] == "1"
        assert metric(client, "aq_version_requests_total", version="1", outcome="client_error") == 1
        assert client.post("/v2/models/tiny/versions/7/infer", json={}).status_code == 404


# ----------------------------------------------------------------------------- two workers


def test_two_workers_follow_a_promotion_without_a_failed_request(tmp_path):
    repo = build_repo(tmp_path / "serving")
    staged = build_repo(tmp_path / "staged")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptive_quant.cli.serve", "--repository", str(repo), "--port", str(port)]
        + ["--workers", "2", "--set", "rollout.poll_s=0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def keep_sending() -> None:
            i = 0
            while not stop.is_set():  # a new connection each: both workers answer
                r = httpx.post(f"{url}/v1/classify", json=body(seed=i % 8), headers={"Connection": "close"}, timeout=10)
                answers.append((r.status_code, r.headers.get("X-Model-Version")))
                i += 1

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            wait_until(lambda: len(answers) > 10, "the first answers", 60)
            n = start_canary(repo, staged, share=0.5, mirror_share=0.5)
            workers = lambda state: metric_sum(url, "aq_model_version_workers", version=str(n), state=state)  # noqa: E731
            wait_until(lambda: workers("canary") == 2, "both workers hold the canary", 60)
            promote(repo)
            wait_until(lambda: workers("serving") == 2, "both workers serve version 2", 60)
            after = len(answers)
            wait_until(lambda: len(answers) > after + 10, "answers after the promotion", 60)
        finally:
            stop.set()
            sender.join(30)
        assert {code for code, _ in answers} == {200}
        assert {v for _, v in answers} == {"1", "2"}
        assert {v for _, v in answers[after + 1 :]} == {"2"}  # + 1: the one in flight at the switch
        assert metric_sum(url, "aq_model_version_workers", version="1", state="serving") == 0
        assert metric_sum(url, "aq_mirror_comparisons_total", version="2", result="disagree") == 0
    finally:
        stop_process(proc)


def metric_sum(url: str, name: str, **labels: str) -> float:
    with httpx.Client(base_url=url, timeout=5) as c:
        return metric(c, name, **labels)
