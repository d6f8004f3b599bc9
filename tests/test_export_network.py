"""A second network added to an existing repository as follow-up variants (`aq-export --add-network`):
the new version serves its FP32 and INT8 beside the repository's own, never as the entry pass, with
its figures, its MLflow run and its gate; checkpoints that do not fit are refused, leaving it as it was."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from adaptive_quant.cli.export import main as export_main
from adaptive_quant.config import ExportConfig
from adaptive_quant.core.manifest import load_manifest, sha256_file
from adaptive_quant.core.versions import read_index
from adaptive_quant.data import load_dataset
from adaptive_quant.export.network import add_network
from adaptive_quant.export.ort_eval import make_session, run_batched
from adaptive_quant.export.rollout_checks import check_gates
from adaptive_quant.export.variant import VariantError
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.settings import load_settings
from adaptive_quant.training.augment import to_normalized_tensor
from conftest import EXPORT_FAST
from gateway_repo import b64_instance, images

NAME = "cifar_other"  # the second network's model name: variant keys other_fp32, other_int8


def _renamed(src, dst, **config):
    """The checkpoint at `src` saved at `dst` with top-level config keys (and model.name) replaced.

    The same weights under another name: enough for the export's mechanics (files, gate, manifest,
    versions), which do not depend on the two networks erring differently.
    """
    payload = torch.load(src, map_location="cpu", weights_only=True)
    name = config.pop("model_name", NAME)
    payload["config"] = {**payload["config"], **config, "model": {**payload["config"]["model"], "name": name}}
    torch.save(payload, dst)
    return dst


def _files(repo) -> dict[str, bytes]:
    """Every file of the repository (versions.json, manifests, ONNX files, configs) by relative path."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_checkpoint(smoke_run, tmp_path_factory):
    _, result, _ = smoke_run
    return _renamed(result.checkpoint, tmp_path_factory.mktemp("other") / "best.pt")


@pytest.fixture(scope="module")
def added(smoke_export, smoke_run, other_checkpoint, tmp_path_factory):
    """(manifest before, NetworkResult) of the network added to a copy of the session's smoke repository.

    MLflow on: its figures go into the checkpoint's training run (the smoke run's SQLite store)."""
    repo = tmp_path_factory.mktemp("network") / "repo"
    shutil.copytree(smoke_export[0], repo)  # the session's repository, left as it is for the others
    before = load_manifest(repo)
    cfg = ExportConfig(repository=str(repo), **EXPORT_FAST)
    return before, add_network(other_checkpoint, repo, export_cfg=cfg, tracking=True)


def test_the_new_version_serves_the_network_as_follow_ups(added) -> None:
    before, r = added
    m = load_manifest(r.repository, verify_files=True)  # every sha256 matches its file
    assert read_index(r.repository).serving == 2 == m.version == r.version
    assert r.key == "other" and set(r.entries) == {"other_fp32", "other_int8"}
    for key, precision in (("other_fp32", "fp32"), ("other_int8", "int8")):
        v = m.variants[key]
        assert v.triton_name == f"{NAME}_{precision}" and v.precision == precision
        assert v.path == f"{NAME}_{precision}/2/model.onnx"
        assert v.network == NAME and v.followup_only and v.served and not v.opt_in
        assert sha256_file(r.repository / v.path) == v.sha256
        assert (r.repository / v.triton_name / "config.pbtxt").is_file()
        assert set(v.latency.batches) == set(m.variants["int8"].latency.batches)  # the repository's batch sizes
    assert "other_fp16" not in m.variants  # no FP16: slower than FP32 on CPU
    for k, old in before.variants.items():  # the repository's own variants, plans and router are kept
        assert m.variants[k].sha256 == old.sha256 and not m.variants[k].network and not m.variants[k].followup_only
    assert m.plans == before.plans
    assert m.router == {**before.router, "path": "router/2/deferral.npz", "spec_path": "router/2/deferral.json"}
    assert not list(r.repository.parent.glob(".repo.*")), "no temporary folder left behind"


def test_onnx_runtime_accuracy_is_the_manifest_s(added, smoke_run) -> None:
    cfg, _, _ = smoke_run
    _, r = added
    m = load_manifest(r.repository)
    val = load_dataset(cfg.data, cfg.seed).val
    x = to_normalized_tensor(val.images).numpy()
    int8 = run_batched(make_session(str(r.repository / m.variants["other_int8"].path)), x)
    assert float((int8.argmax(1) == val.labels).mean()) == m.variants["other_int8"].val_accuracy
    own = run_batched(make_session(str(r.repository / m.variants["int8"].path)), x)
    info = m.networks[NAME]
    assert info["agreement_with_int8"] == float((int8.argmax(1) == own.argmax(1)).mean())
    assert info["val_accuracy"] == {k: m.variants[k].val_accuracy for k in ("other_fp32", "other_int8")}
    assert set(info["time_vs_int8"]) == {"other_fp32", "other_int8"}


def test_the_manifest_links_the_network_s_training_run(added, other_checkpoint, smoke_run) -> None:
    _, _, uri = smoke_run
    _, r = added
    info = load_manifest(r.repository).networks[NAME]
    payload = torch.load(other_checkpoint, map_location="cpu", weights_only=True)
    assert info["key"] == "other" and info["mlflow_run_id"] == payload["mlflow_run_id"] is not None
    assert info["config"]["model"]["name"] == NAME and info["checkpoint"] == str(other_checkpoint)
    assert not info["gate"]["forced"] and info["gate"]["limit_points"] == ExportConfig().max_accuracy_drop
    run = MlflowClient(tracking_uri=uri).get_run(info["mlflow_run_id"])
    assert run.data.tags["export.network"] == NAME
    assert run.data.metrics["export/other_int8_val_acc"] == r.gates["other_int8"].accuracy


def test_the_gateway_never_takes_the_entry_pass_on_it(added) -> None:
    _, r = added
    settings = load_settings(overrides={"repository": str(r.repository)}, environ={})
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/classify", json={"instances": [b64_instance(i) for i in images(4, seed=3)]})
        assert resp.status_code == 200, resp.text
        keys = {v["key"] for v in client.get("/v1/status").json()["variants"]}
    assert {"other_fp32", "other_int8"} <= keys
    assert [p["passes"][0] for p in resp.json()["predictions"]] == ["int8"] * 4


def test_check_gates_measures_a_network_against_its_own_fp32(added) -> None:
    _, r = added
    m = load_manifest(r.repository)
    assert check_gates(m, ExportConfig()) == []
    # its INT8 at the repository's FP32 figure, its FP32 five points higher: within the limit against
    # the repository's FP32, five points below its own
    own_fp32 = m.variants["fp32"].val_accuracy
    m.variants["other_fp32"] = dataclasses.replace(m.variants["other_fp32"], val_accuracy=own_fp32 + 0.05)
    m.variants["other_int8"] = dataclasses.replace(m.variants["other_int8"], val_accuracy=own_fp32)
    problems = check_gates(m, ExportConfig(max_accuracy_drop=1.0))
    assert len(problems) == 1
    assert "variant other_int8" in problems[0] and "5.00 points below other_fp32's" in problems[0]


def test_refusals_leave_the_repository_as_it_was(added, smoke_run, tmp_path, capsys) -> None:
    _, r = added
    _, result, _ = smoke_run
    before = _files(r.repository)
    # the repository's own network: a new version of it is a plain aq-export
    with pytest.raises(VariantError, match="'cifar_resnet' is the repository's own network"):
        add_network(result.checkpoint, r.repository, tracking=False)
    # another seed draws another validation split
    seeded = _renamed(result.checkpoint, tmp_path / "seeded.pt", seed=43)
    argv = ["--checkpoint", str(seeded), "--repository", str(r.repository), "--add-network", "--no-mlflow"]
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert "seed 43" in err and "another validation split" in err
    # another network whose default key ("other") is taken by cifar_other's variants, or a key not accepted
    clash = _renamed(result.checkpoint, tmp_path / "clash.pt", model_name="resnet_other")
    with pytest.raises(VariantError, match="network key 'other' collides: other_fp32 is already cifar_other_fp32's"):
        add_network(clash, r.repository, tracking=False)
    with pytest.raises(VariantError, match="use a lower-case letter"):
        add_network(clash, r.repository, key="Twin_2", tracking=False)
    assert _files(r.repository) == before  # versions.json, manifests and files untouched
    assert not list(r.repository.parent.glob(".repo.*")), "no temporary folder left behind"


def test_the_cli_re_adds_the_network_as_the_next_version(added, other_checkpoint, capsys) -> None:
    _, r = added
    old = load_manifest(r.repository)
    argv = ["--checkpoint", str(other_checkpoint), "--repository", str(r.repository), "--add-network", "--no-mlflow"]
    assert export_main([*argv, "--set", "export.profile_seconds=0.05", "--set", "export.register=false"]) == 0
    out = capsys.readouterr().out
    assert f"added network {NAME} in version 3" in out and "follow-ups only" in out
    assert "other_int8" in out and "agrees with the repository's INT8" in out
    m = load_manifest(r.repository, verify_files=True)
    assert m.version == 3 and read_index(r.repository).serving == 3
    assert sorted(k for k, v in m.variants.items() if v.network == NAME) == ["other_fp32", "other_int8"]  # replaced
    # the same network exported again: the same figures on the same validation split
    assert m.variants["other_int8"].val_accuracy == old.variants["other_int8"].val_accuracy
    assert old.variants["other_int8"].path != m.variants["other_int8"].path == f"{NAME}_int8/3/model.onnx"
    assert export_main(["--checkpoint", str(other_checkpoint), "--add-network", "--no-mlflow"]) == 2  # no --repository
    assert "--add-network needs --repository" in capsys.readouterr().err


def test_aq_fit_router_fits_plans_across_both_networks(added, smoke_run, tmp_path, capsys) -> None:
    """One plan list for a repository of one network or two: a plan over a variant the repository
    lacks is left out, the others (the second network's included) are measured and routed."""
    from adaptive_quant.cli.fit_router import main as fit_main

    cfg, _, _ = smoke_run
    _, r = added
    repo = tmp_path / "repo"
    shutil.copytree(r.repository, repo)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"seed": cfg.seed, "data": cfg.data.model_dump()}))
    plans = "export.plans=[other_int8:hflip,int8:hflip+other_int8,missing_int8]"
    code = fit_main(["--config", str(config), "--repository", str(repo), "--set", plans, "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    m = load_manifest(repo, verify_files=True)
    assert m.router["plans"] == ["none", "other_int8:hflip", "int8:hflip+other_int8"]  # missing_int8 left out
    assert [(p.name, p.entry) for p in m.plans] == [("other_int8:hflip", "int8"), ("int8:hflip+other_int8", "int8")]
    assert all(0 < p.val_accuracy <= 1 and p.extra_ms for p in m.plans)
    # priced by the profiles of the passes: the two-pass plan costs more than the one-pass plan
    assert m.plans[1].extra_ms_at(1) > m.plans[0].extra_ms_at(1)
    settings = load_settings(overrides={"repository": str(repo)}, environ={})
    with TestClient(create_app(settings)) as client:
        status = client.get("/v1/status").json()
        resp = client.post(
            "/v1/classify",
            json={"instances": [b64_instance(i) for i in images(8, seed=5)]},
            headers={"X-Priority": "quality"},
        )
    assert resp.status_code == 200, resp.text
    allowed = {"int8", "int8:hflip", "other_int8", "other_int8:hflip"}
    for p in resp.json()["predictions"]:
        assert p["passes"][0] == "int8" and set(p["passes"]) <= allowed, p["passes"]
    assert status["router"]["plans"] == ["other_int8:hflip", "int8:hflip+other_int8"]
