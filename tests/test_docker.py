"""docker/: the compose file parses, and every path, port, name and metric it relies on exists and agrees
with configs/serve.yaml, configs/default.yaml and the code (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from adaptive_quant.core.precision import Precision, triton_model_name
from adaptive_quant.serving.metrics import GatewayMetrics
from adaptive_quant.serving.settings import ignored_variables, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
TRITON_HTTP, TRITON_GRPC, TRITON_METRICS = 8000, 8001, 8002  # Triton's own ports inside its container


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def serve():
    return load_settings(ROOT / "configs" / "serve.yaml", environ={})


@pytest.fixture(scope="module")
def train_cfg() -> dict:
    return yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())


def container_ports(service: dict) -> dict[int, int]:
    """{container port: host port}"""
    out = {}
    for p in service.get("ports", []):
        host, container = str(p).split(":")[-2:]
        out[int(container)] = int(host)
    return out


def test_the_stack_has_its_services_and_unique_host_ports(compose):
    services = compose["services"]
    assert {"triton", "gateway", "mlflow", "prometheus", "grafana"} <= set(services)
    hosts = [h for s in services.values() for h in container_ports(s).values()]
    assert len(hosts) == len(set(hosts)), f"host ports collide: {sorted(hosts)}"
    assert container_ports(services["triton"]).keys() >= {TRITON_HTTP, TRITON_GRPC, TRITON_METRICS}


def test_every_mounted_path_exists_or_is_what_the_configs_produce(compose, serve, train_cfg):
    produced = {  # made by the pipeline, git-ignored: they must be the folders the configs name
        (ROOT / serve.repository).resolve(),
        (ROOT / train_cfg["data"]["root"]).resolve().parent,  # data/
        (ROOT / train_cfg["output_dir"]).resolve().parent,  # runs/
    }
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
                continue
            path = (DOCKER / source).resolve()
            assert path.exists() or path in produced, f"{name}: {source} does not exist and no config produces it"


def test_the_gateway_points_at_triton_and_agrees_with_serve_yaml(compose, serve):
    gw = compose["services"]["gateway"]
    env = {k: str(v) for k, v in gw["environment"].items()}
    assert ignored_variables(env) == []  # every AQ_* key is a gateway setting (strays are only warned about)
    settings = load_settings(ROOT / "configs" / "serve.yaml", environ=env)
    assert settings.backend.kind == "triton" and settings.backend.model_control == "explicit"
    host, port = settings.backend.triton_url.split(":")
    assert host == "triton" and int(port) == (
        TRITON_GRPC if settings.backend.triton_protocol == "grpc" else TRITON_HTTP
    )
    assert settings.backend.triton_metrics_url == f"http://triton:{TRITON_METRICS}/metrics"
    assert settings.server.port in container_ports(gw) and settings.server.host == "0.0.0.0"
    assert container_ports(gw)[settings.server.port] == serve.server.port  # the port the README and scripts use
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    assert (DOCKER / mounts[settings.repository]).resolve() == (ROOT / serve.repository).resolve()


def test_triton_serves_the_production_repository_in_explicit_mode(compose, serve, train_cfg):
    triton = compose["services"]["triton"]
    args = triton["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in triton["volumes"]}
    repo_in_container = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
    assert (DOCKER / mounts[repo_in_container]).resolve() == (ROOT / serve.repository).resolve()
    assert "--model-control-mode=explicit" in args
    loaded = sorted(a.split("=", 1)[1] for a in args if a.startswith("--load-model="))
    assert loaded == sorted(triton_model_name(train_cfg["model"]["name"], p) for p in Precision)


def test_prometheus_scrapes_the_gateway_and_triton_where_they_listen(serve):
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {j["job_name"]: t for j in prom["scrape_configs"] for sc in j["static_configs"] for t in sc["targets"]}
    assert targets == {"gateway": f"gateway:{serve.server.port}", "triton": f"triton:{TRITON_METRICS}"}


def test_grafana_is_provisioned_with_a_dashboard_on_metrics_that_exist(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve() for v in grafana["volumes"] if v.startswith(".")}
    provisioning = mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and 9090 in container_ports(compose["services"]["prometheus"])
    provider = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"][0]
    dash_dir = mounts[provider["options"]["path"]]
    dashboard = json.loads((dash_dir / "adaptive-quant.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert all(t["datasource"]["uid"] == ds["uid"] for p in dashboard["panels"] for t in p["targets"])
    # metric families the gateway exports (+ the memory policy's gauge, registered at start-up)
    families = {m.name for m in GatewayMetrics().registry.collect()} | {"aq_variant_loaded"}
    used = {re.sub(r"_(bucket|total|count|sum)$", "", n) for e in exprs for n in re.findall(r"\baq_[a-z_]+", e)}
    assert used and used <= families, used - families
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert "latency per variant" in titles and "routing mix" in titles and "budget misses" in titles
    assert any("nv_inference_count" in e for e in exprs)


def test_gateway_image_installs_the_serve_extra_pinned_by_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    serve = {name(r) for r in project["dependencies"] + project["optional-dependencies"]["serve"]}
    assert not {"torch", "torchao", "mlflow", "onnx", "onnxscript", "matplotlib"} & serve
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    pinned = {name(ln): ln.split("==")[1] for ln in lines if ln}
    assert serve <= set(pinned), serve - set(pinned)  # every serving dependency has a pinned version
    dockerfile = (DOCKER / "Dockerfile.gateway").read_text()
    assert 'pip install -c requirements.txt ".[serve]"' in dockerfile
    assert not (DOCKER / "requirements-serve.txt").exists()  # no hand-copied second list to drift
    ray = {name(r) for r in project["optional-dependencies"]["ray"]} - {"adaptive-quant"}
    assert ray <= set(pinned), ray - set(pinned)  # the Ray image's Ray is the version the tests ran
    assert 'pip install -c requirements.txt ".[ray]"' in (DOCKER / "Dockerfile.ray").read_text()
    for dockerfile_name in ("Dockerfile.gateway", "Dockerfile.train", "Dockerfile.ray"):
        text = (DOCKER / dockerfile_name).read_text()
        for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
            for source in sources.split():
                assert (ROOT / source).exists(), f"{dockerfile_name} copies {source}, which is not in the repository"
    assert "aq-serve" in dockerfile and "aq-serve" in project["scripts"]


def test_published_ports_are_loopback_and_the_gateway_may_drain(compose, serve):
    for name, service in compose["services"].items():
        for p in service.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} on every host interface"
    grace = compose["services"]["gateway"]["stop_grace_period"]
    assert (
        grace.endswith("s") and float(grace[:-1]) > serve.server.drain_timeout_s
    )  # docker's SIGKILL comes after the drain
