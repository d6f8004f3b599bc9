"""deploy/k8s/: the Kubernetes manifests, validated offline (no cluster, no network).

- the RayService against KubeRay's own CRD schema (vendored, deploy/k8s/schemas/), unknown fields
  refused as `kubectl apply` (strict field validation) refuses them;
- its serveConfigV2 against Ray Serve's own config schema, every key known, and every deployment one
  that adaptive_quant.serving.ray.app:build_app makes from the model repository;
- the built-in kinds (Deployment, Service) against Kubernetes' OpenAPI schemas (kubernetes-validate);
- the cross-references a schema cannot see: PVC mounts, ports, probes, the gateway's settings.
Each validator is also shown a real mistake and must refuse it.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

from adaptive_quant.core.versions import load_version_manifest, read_index
from adaptive_quant.serving.ray.app import deployment_names
from adaptive_quant.serving.settings import ignored_variables, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CRD_SCHEMA = K8S / "schemas" / "rayservice-v1.schema.json.gz"
# the oldest and the newest Kubernetes that kubernetes-validate 1.37 ships schemas for and we claim
K8S_VERSIONS = ("1.30", "1.37")
PVC = "adaptive-quant-models"
MODELS_PATH = "/models"


# ---- loading ------------------------------------------------------------------------------------


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (doc,) = load_docs("rayservice.yaml")
    return doc


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.protocols.Validator:
    schema = strict_structural(json.loads(gzip.decompress(CRD_SCHEMA.read_bytes())))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def pod_specs(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


# ---- the CRD schema as the API server applies it ------------------------------------------------


def strict_structural(node: Any) -> Any:
    """A Kubernetes structural schema as plain JSON Schema, with the API server's strictness:
    an object with `properties` takes no other field (kubectl apply's default, strict field
    validation, refuses unknown fields; plain JSON Schema would let them through), unless it says
    x-kubernetes-preserve-unknown-fields. x-kubernetes-int-or-string becomes its anyOf.
    CEL rules (x-kubernetes-validations) are not evaluated: the API server runs them."""
    if isinstance(node, list):
        return [strict_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_structural(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def crd_errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_vendored_schema_is_the_one_source_md_names():
    """Nobody loosened the schema by hand: its JSON hashes to what SOURCE.md records."""
    recorded = re.search(r"schema JSON sha256 `([0-9a-f]{64})`", (K8S / "schemas" / "SOURCE.md").read_text())
    assert recorded, "SOURCE.md records no sha256 of the schema JSON"
    assert hashlib.sha256(gzip.decompress(CRD_SCHEMA.read_bytes())).hexdigest() == recorded.group(1)


def test_the_rayservice_matches_kuberays_crd(rayservice, crd_validator):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert crd_errors(crd_validator, rayservice) == []
    # metadata is `type: object` in the CRD; the API server checks the name as a DNS label
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", rayservice["metadata"]["name"])
    # kubebuilder enum in rayservice_types.go, not in the generated schema
    assert rayservice["spec"]["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


def _set(doc: dict, path: str, value: Any) -> dict:
    """A copy of `doc` with the dotted `path` (list indices as numbers) set to `value`."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    node[last] = value
    return doc


def _rename(doc: dict, path: str, new_key: str) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p) if p.isdigit() else p]
    node[new_key] = node.pop(last)
    return doc


@pytest.mark.parametrize(
    "mutate, where",
    [
        # serveConfigV2 is a YAML string, not the mapping itself
        (lambda d: _set(d, "spec.serveConfigV2", yaml.safe_load(d["spec"]["serveConfigV2"])), "spec.serveConfigV2"),
        # a misspelt field: pruned silently by a lenient server, refused by a strict one
        (
            lambda d: _rename(d, "spec.rayClusterConfig.workerGroupSpecs.0.minReplicas", "minReplica"),
            "'minReplica' was unexpected",
        ),
        # rayStartParams is map[string]string: an unquoted 0 is an integer
        (lambda d: _set(d, "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0), "rayStartParams"),
        # a container port as a string
        (
            lambda d: _set(
                d, "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports.0.containerPort", "6379"
            ),
            "containerPort",
        ),
        # a required field missing (a container without a name)
        (
            lambda d: _set(
                d,
                "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0",
                {"image": "adaptive-quant-ray:0.2.0"},
            ),
            "containers",
        ),
    ],
    ids=["serveConfigV2-not-a-string", "misspelt-field", "rayStartParams-int", "port-as-string", "container-no-name"],
)
def test_the_crd_validator_refuses_real_mistakes(rayservice, crd_validator, mutate, where):
    errors = crd_errors(crd_validator, mutate(rayservice))
    assert errors, "the mistake went through"
    assert any(where in e for e in errors), errors


# ---- serveConfigV2: Ray Serve's own schema ------------------------------------------------------


def unknown_keys(data: dict, model: type[BaseModel], where: str) -> list[str]:
    """Keys of `data` that are no field of `model`. Ray's schemas ignore extra keys (forward
    compatibility), so a misspelt `max_surge_pecent` would be dropped in silence."""
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{k}: not a field of {model.__name__}" for k in data if k not in known]


def serve_config_errors(config: Any) -> list[str]:
    """What Ray Serve 2.60 would refuse in a serveConfigV2, plus the keys it would ignore."""
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [str(exc)]
    errors = unknown_keys(config, ServeDeploySchema, "serveConfigV2")
    errors += unknown_keys(config.get("http_options", {}), HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        errors += unknown_keys(app, ServeApplicationSchema, app["name"])
        for dep in app.get("deployments", []):
            where = f"{app['name']}.{dep['name']}"
            errors += unknown_keys(dep, DeploymentSchema, where)
            errors += unknown_keys(
                dep.get("ray_actor_options", {}), RayActorOptionsSchema, f"{where}.ray_actor_options"
            )
            scaling = dep.get("autoscaling_config")
            if scaling is not None:  # DeploymentSchema keeps it a dict; Serve builds this at deploy time
                errors += unknown_keys(scaling, AutoscalingConfig, f"{where}.autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(scaling)
                except ValidationError as exc:
                    errors.append(f"{where}.autoscaling_config: {exc}")
    return errors


def test_serve_config_is_a_valid_ray_serve_config(rayservice):
    config = serve_config(rayservice)
    assert serve_config_errors(config) == []
    (app,) = config["applications"]
    assert app["name"] == "adaptive-quant" and app["route_prefix"] == "/"
    assert app["import_path"] == "adaptive_quant.serving.ray.app:build_app"
    # rolling updates start new replicas before stopping old ones: no request is lost to an update
    assert all(d["max_surge_percent"] > 0 for d in app["deployments"])


def _deployment(config: dict, name: str) -> dict:
    (dep,) = [d for d in config["applications"][0]["deployments"] if d["name"] == name]
    return dep


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda c: _deployment(c, "variant-int8").update(max_surge_pecent=25), "max_surge_pecent"),  # Ray ignores it
        (lambda c: _deployment(c, "variant-int8").update(max_surge_percent=150), "max_surge_percent"),  # over 100 %
        (lambda c: _deployment(c, "variant-fp32").update(num_replicas=2), "num_replicas"),  # fixed and autoscaled
        (lambda c: _deployment(c, "variant-fp32")["autoscaling_config"].update(min_replicas=5), "min_replicas"),
        (
            lambda c: _deployment(c, "gateway")["autoscaling_config"].update(target_ongoing_request=3),
            "target_ongoing_request",
        ),
        (lambda c: c["applications"][0].pop("import_path"), "import_path"),
    ],
    ids=[
        "misspelt-key",
        "surge-over-100",
        "replicas-and-autoscaling",
        "min-over-max",
        "misspelt-autoscaling",
        "no-import-path",
    ],
)
def test_the_serve_config_check_refuses_real_mistakes(rayservice, mutate, where):
    config = serve_config(rayservice)
    mutate(config)
    errors = serve_config_errors(config)
    assert errors, "the mistake went through"
    assert any(where in e for e in errors), errors


def built_deployments(repository: Path) -> set[str]:
    """The deployments build_app makes from `repository` with configs/serve.yaml (its `variants` pin)."""
    settings = load_settings(ROOT / "configs" / "serve.yaml", {"repository": str(repository)}, environ={})
    return set(deployment_names(settings))


def deployment_name_errors(config: dict, built: set[str]) -> list[str]:
    named = {d["name"] for d in config["applications"][0]["deployments"]}
    errors = [f"{n}: build_app makes no such deployment (it makes {sorted(built)})" for n in sorted(named - built)]
    # one left out would run with the code's defaults, outside this file's capacity plan
    errors += [f"{n}: built by the app but not configured here" for n in sorted(built - named)]
    return errors


def test_every_deployment_is_one_the_app_builds(rayservice):
    built = built_deployments(ROOT / "model_repository")
    assert {"gateway", "variant-int8", "variant-fp32"} <= built
    assert deployment_name_errors(serve_config(rayservice), built) == []


def test_an_unknown_deployment_name_is_refused(rayservice):
    config = serve_config(rayservice)
    _deployment(config, "variant-fp16")["name"] = "variant-float16"
    errors = deployment_name_errors(config, built_deployments(ROOT / "model_repository"))
    assert any("variant-float16: build_app makes no such" in e for e in errors)
    assert any("variant-fp16: built by the app but not configured" in e for e in errors)


def test_the_app_args_name_what_the_image_and_the_pods_have(rayservice):
    args = serve_config(rayservice)["applications"][0]["args"]
    assert (ROOT / args["config"]).is_file()  # the image copies configs/ into its working directory
    assert args["repository"] == MODELS_PATH
    load_settings(ROOT / args["config"], {"repository": args["repository"]}, environ={})  # the builder's call


# ---- the Ray cluster ----------------------------------------------------------------------------


def cpus(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("4", "500m", 2) in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_the_cluster_holds_what_serve_asks_for(rayservice):
    """KubeRay's autoscaler adds workers for the replicas Serve's autoscaler asks for: the worker
    group must hold every deployment's minimum at minReplicas and its maximum at maxReplicas."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    per_worker = cpus(container["resources"]["limits"]["cpu"])  # KubeRay sets Ray's num-cpus from it
    deployments = serve_config(rayservice)["applications"][0]["deployments"]
    low = sum(d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"]["num_cpus"] for d in deployments)
    high = sum(d["autoscaling_config"]["max_replicas"] * d["ray_actor_options"]["num_cpus"] for d in deployments)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert low <= group["minReplicas"] * per_worker, f"{low} CPUs of minimum replicas"
    assert high <= group["maxReplicas"] * per_worker, f"{high} CPUs of maximum replicas"


def test_ray_pods_have_the_image_ports_and_read_only_models(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    # serveConfigV2 was checked against this Ray's schema: it holds for the cluster only at this version
    assert cluster["rayVersion"] == ray.__version__ == "2.60.0"
    for group, spec in pod_specs(rayservice).items():
        (container,) = spec["containers"]
        assert container["image"] == "adaptive-quant-ray:0.2.0", group
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"gcs-server": 6379, "dashboard": 8265, "serve": 8000} if group == "head" else {"serve": 8000}
        assert expected.items() <= ports.items(), group
        assert container["resources"]["requests"] and container["resources"]["limits"], group
        assert_models_read_only(spec, container, group)


def assert_models_read_only(spec: dict, container: dict, where: str) -> None:
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == MODELS_PATH]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == PVC and claim["readOnly"] is True, where
    assert mount["readOnly"] is True, where


# ---- built-in kinds: Kubernetes' own schemas -----------------------------------------------------

BUILTIN_FILES = ("triton.yaml", "gateway-triton.yaml")


def k8s_errors(doc: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", BUILTIN_FILES)
def test_builtin_kinds_match_kubernetes_schemas(name, version):
    docs = load_docs(name)
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    for doc in docs:
        assert k8s_errors(doc, version) == [], f"{name} {doc['kind']}"


@pytest.mark.parametrize(
    "path, value, where",
    [
        ("spec.template.spec.containers.0.ports.0.containerPort", "8000", "containerPort"),  # a port as a string
        ("spec.template.spec.containers.0.readinesProbe", {"httpGet": {"path": "/", "port": 8000}}, "readinesProbe"),
        ("spec.replicas", "1", "replicas"),
    ],
    ids=["port-as-string", "misspelt-field", "replicas-as-string"],
)
def test_kubernetes_validate_refuses_real_mistakes(path, value, where):
    deployment = by_kind(load_docs("triton.yaml"), "Deployment")
    errors = k8s_errors(_set(deployment, path, value), K8S_VERSIONS[-1])
    assert errors, "the mistake went through"
    assert any(where in e for e in errors), errors


# ---- Triton and the gateway in front of it -------------------------------------------------------


def test_triton_serves_the_model_repository():
    docs = load_docs("triton.yaml")
    deployment, service = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:2[56]\.\d\d-py3", container["image"])
    argv = container["command"] + container["args"]
    assert argv[0] == "tritonserver"
    assert f"--model-repository={MODELS_PATH}" in argv and "--model-control-mode=explicit" in argv
    # every model loaded at start is a served variant's Triton model, present in the repository
    repo = ROOT / "model_repository"
    manifest = load_version_manifest(repo, read_index(repo).serving)
    served = {v.triton_name for v in manifest.served_variants()}
    loaded = [a.split("=", 1)[1] for a in argv if a.startswith("--load-model=")]
    assert loaded and set(loaded) <= served
    assert all((repo / name / "config.pbtxt").is_file() for name in loaded)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert_models_read_only(spec, container, "triton")
    assert_service_reaches(service, deployment)


def assert_service_reaches(service: dict, deployment: dict) -> None:
    """The Service selects the Deployment's Pods, and each target port is a named container port."""
    template = deployment["spec"]["template"]
    selector = service["spec"]["selector"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    named = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
    for port in service["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"], port


def test_the_gateway_reaches_triton_through_its_service():
    triton = load_docs("triton.yaml")
    gateway_docs = load_docs("gateway-triton.yaml")
    deployment, service = by_kind(gateway_docs, "Deployment"), by_kind(gateway_docs, "Service")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["aq-serve"]
    args = container["args"]
    flags = dict(zip(args[::2], args[1::2]))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ignored_variables(env) == []  # every AQ_* name is a gateway setting
    overrides = {"backend.kind": flags["--backend"], "backend.triton_url": flags["--triton-url"]}
    settings = load_settings(ROOT / flags["--config"], overrides, environ=env)  # refuses a misspelt setting

    host, port = settings.backend.triton_url.rsplit(":", 1)
    triton_service = by_kind(triton, "Service")
    assert host == triton_service["metadata"]["name"]
    proto = settings.backend.triton_protocol
    assert int(port) in {p["port"] for p in triton_service["spec"]["ports"] if p["name"] == proto}
    # explicit model control on both sides: the gateway loads what Triton does not load at start
    triton_args = by_kind(triton, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert settings.backend.model_control == "explicit" and "--model-control-mode=explicit" in triton_args
    assert settings.repository == MODELS_PATH and settings.server.host == "0.0.0.0"
    # SIGTERM drains the requests in flight before the kubelet's SIGKILL
    assert spec["terminationGracePeriodSeconds"] > settings.server.drain_timeout_s
    assert int(settings.server.resolved_workers()) <= cpus(container["resources"]["limits"]["cpu"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert settings.server.port == {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert_models_read_only(spec, container, "gateway")
    assert_service_reaches(service, deployment)
