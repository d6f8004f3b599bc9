"""The gateway's Ray Serve application on a 2-node cluster (ray.cluster_utils.Cluster: two raylets on
this machine, one CPU each, no dashboard), reached over HTTP through Serve's proxy.

In order, on one application whose INT8 deployment autoscales between 1 and 2 replicas, at most
one per node: load scales INT8 up, with its replicas on both nodes; idle scales it down; under
load again a node is removed, after which requests succeed again (the ones lost in flight are
counted and printed: they are the figure the issue asks for, not an assertion)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray  # the `ray` extra (make setup installs .[all])
from ray import serve
from ray.cluster_utils import Cluster

from adaptive_quant.serving.backends.ray import deployment_name
from adaptive_quant.serving.ray.app import build_application
from adaptive_quant.serving.settings import load_settings
from gateway_process import free_port
from gateway_repo import b64_instance, build_repo, images

APP = "aq-cluster-test"
STORE = 80 * 2**20  # bytes of object store per node: requests are ~12 KB per image


def _settings(repo):
    return load_settings(
        overrides={
            "repository": str(repo),
            "variants": ["int8", "fp32"],
            "profiling.budget_s": 0.5,
            "ray.app_name": APP,
            "ray.ingress": {"num_cpus": 0.2, "max_ongoing_requests": 64},
            "ray.default_variant": {"num_cpus": 0.2},
            "ray.variants": {
                "int8": {
                    "min_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "num_cpus": 0.2,
                    "max_replicas_per_node": 1,  # the second replica must go to the other node
                }
            },
            "ray.upscale_delay_s": 0.5,
            "ray.downscale_delay_s": 3.0,
        },
        environ={},
    )


class Load:
    """`threads` clients sending classify requests (16 images each) until stopped: status codes."""

    def __init__(self, url: str, threads: int = 6) -> None:
        self.url = url
        self.codes: list[int] = []
        self.stop = threading.Event()
        body = {"instances": [b64_instance(img) for img in images(16, seed=2)]}
        self.threads = [threading.Thread(target=self._run, args=(body,), daemon=True) for _ in range(threads)]

    def _run(self, body: dict) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v1/classify", json=body, headers={"X-Priority": "speed"})
                    self.codes.append(r.status_code)
                except httpx.HTTPError:
                    self.codes.append(0)  # no answer: lost in flight

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)


def running_replicas(name: str) -> int:
    deployments = serve.status().applications[APP].deployments
    return int(deployments[name].replica_states.get("RUNNING", 0)) if name in deployments else 0


def wait_for(check, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.5)
    return got


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": STORE},
    )
    worker = c.add_node(num_cpus=1, object_store_memory=STORE)
    ray.init(address=c.address, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        repo = build_repo(tmp_path_factory.mktemp("ray_cluster") / "repo")
        serve.run(build_application(_settings(repo)), name=APP, route_prefix="/")
        yield {"cluster": c, "worker": worker, "url": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def test_load_scales_the_int8_deployment_up_with_replicas_on_both_nodes(cluster):
    url = cluster["url"]
    assert running_replicas(deployment_name("int8")) == 1
    with Load(url) as load:
        wait_for(lambda: running_replicas(deployment_name("int8")) == 2, "a second INT8 replica under load")
        # the coalescer's limit grows with the replicas, so the new one gets calls; its answers name its node
        seen = wait_for(
            lambda: (
                len(set(status(url)["int8"]["replicas_seen"].values())) == 2 and status(url)["int8"]["replicas_seen"]
            ),
            "answers from INT8 replicas on both nodes",
        )
    assert set(seen.values()) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(load.codes) == {200}


def test_idle_scales_it_back_down(cluster):
    wait_for(lambda: running_replicas(deployment_name("int8")) == 1, "back to one INT8 replica when idle")
    r = httpx.post(f"{cluster['url']}/v1/classify", json={"instances": [b64_instance(images(1)[0])]}, timeout=30)
    assert r.status_code == 200


def test_a_node_removed_under_load_and_requests_succeed_again(cluster):
    url = cluster["url"]
    with Load(url) as load:
        wait_for(lambda: running_replicas(deployment_name("int8")) == 2, "two INT8 replicas again")
        wait_for(lambda: len(load.codes) > 20, "answers before the node goes")
        before = len(load.codes)
        cluster["cluster"].remove_node(cluster["worker"])  # its raylet and every replica on it die
        wait_for(lambda: len(load.codes) > before + 10, "answers after the node went", timeout_s=180)
        # recovered: the last 20 answers are all 200
        wait_for(lambda: len(load.codes) > before + 30 and set(load.codes[-20:]) == {200}, "20 answers in a row")
    lost = [c for c in load.codes[before:] if c != 200]
    print(f"\nnode removed under load: {len(lost)} of {len(load.codes) - before} requests lost in flight ({lost[:10]})")
    r = httpx.post(f"{url}/v1/classify", json={"instances": [b64_instance(images(1)[0])]}, timeout=30)
    assert r.status_code == 200


def status(url: str) -> dict:
    body = httpx.get(f"{url}/v1/status", timeout=30).json()
    return {v["key"]: v["batching"] for v in body["variants"]}
