"""MLflow runs as a person sees them in the UI: distinct, readable names and the runs table first.

Real MLflow on a temporary SQLite store with a file artifact root, as the project logs by default.
"""

from __future__ import annotations

import random
import re

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from adaptive_quant import tracking
from adaptive_quant.config import TrackingConfig
from adaptive_quant.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, describe_overrides, start_run, ui_link


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    # one SQLite store for the module: creating one runs MLflow's migrations, seconds on 2 cores
    tmp = tmp_path_factory.mktemp("mlflow")
    return {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "artifact_root": str(tmp / "artifacts")}


@pytest.fixture
def cfg(store, request) -> TrackingConfig:
    return TrackingConfig(**store, experiment=request.node.name)  # an experiment per test


@pytest.fixture(autouse=True)
def _fresh_invocation(monkeypatch):
    # name_runs_after sets a process-wide label; no test may leak it into another
    monkeypatch.setattr(tracking, "_invocation_label", None)


def _seeded_run(cfg: TrackingConfig, kind: str) -> str:
    random.seed(42)  # what training's seed_everything does before it opens its run
    np.random.seed(42)
    with start_run(cfg, kind=kind) as tracker:
        return tracker.run_id


def test_two_runs_with_the_same_seed_get_distinct_readable_names(cfg):
    tracking.name_runs_after("configs/default.yaml", ["train.epochs=5", f"tracking.tracking_uri={cfg.tracking_uri}"])
    ids = [_seeded_run(cfg, "train"), _seeded_run(cfg, "train")]
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    names = [client.get_run(i).info.run_name for i in ids]
    assert names[0] != names[1], names
    # kind, config, the override that changes the run (not where it is logged), UTC time; a repeat in
    # the same second gets a suffix
    for name in names:
        assert re.fullmatch(r"train-default-epochs=5-\d{8}-\d{6}(-2)?", name), name


def test_each_kind_of_run_says_what_it_is(cfg):
    tracking.name_runs_after("configs/smoke.yaml")
    ids = {kind: _seeded_run(cfg, kind) for kind in ("train", "export", "evaluate-in-process", "evaluate-http")}
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    for kind, run_id in ids.items():
        assert client.get_run(run_id).info.run_name.startswith(f"{kind}-smoke-")


def test_a_run_name_in_the_config_is_used_as_given(store):
    cfg = TrackingConfig(**store, experiment="given-name", run_name="baseline-for-the-paper")
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    assert client.get_run(_seeded_run(cfg, "train")).info.run_name == "baseline-for-the-paper"


def test_without_a_command_line_the_name_is_kind_and_time(cfg):
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    name = client.get_run(_seeded_run(cfg, "export")).info.run_name
    assert re.fullmatch(r"export-\d{8}-\d{6}", name), name


def test_overrides_are_shortened_but_stay_unambiguous():
    assert describe_overrides(["train.lr=0.1"]) == "lr=0.1"
    assert describe_overrides(["train.epochs=5", "qat.epochs=1"]) == "train.epochs=5,qat.epochs=1"
    assert describe_overrides(["output_dir=runs/default_qat2"]) == "output_dir=default_qat2"
    # what changed the run comes before where it went: the UI's name column shows ~24 characters
    assert describe_overrides(["output_dir=/tmp/run", "train.epochs=2"]) == "epochs=2,output_dir=run"
    assert describe_overrides(["model.widths=[16, 32, 64, 64]"]) == "widths=[16,32,64,64]"
    assert describe_overrides(["tracking.tracking_uri=sqlite:///x.db", "tracking.experiment=e"]) == ""
    label = tracking.run_label("configs/default.yaml", [f"data.root=/data/{'x' * 40}", f"model.name={'y' * 80}"])
    assert len(label) <= 60 and label.startswith("default-root=")


def test_a_new_experiment_is_a_model_training_experiment(cfg):
    _seeded_run(cfg, "train")
    exp = MlflowClient(tracking_uri=cfg.tracking_uri).get_experiment_by_name(cfg.experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_and_a_chosen_kind_is_kept(cfg, store, tmp_path):
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    client.create_experiment(cfg.experiment, artifact_location=(tmp_path / "artifacts").as_uri())  # an old store
    other = client.create_experiment(
        "chosen", artifact_location=(tmp_path / "a2").as_uri(), tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    _seeded_run(cfg, "train")
    assert client.get_experiment_by_name(cfg.experiment).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    _seeded_run(TrackingConfig(**store, experiment="chosen"), "train")
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_links_to_a_tracking_server_open_the_runs_table_not_the_genai_overview():
    # the MLflow 3.17 UI follows its GenAI / Model training switch, default GenAI, unless the link says
    assert ui_link("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert (
        ui_link("https://mlflow.example", "3") == "https://mlflow.example/#/experiments/3?workflowType=machine_learning"
    )
    # a local store: where `mlflow ui` serves it by default
    assert ui_link("sqlite:///mlruns.db", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


def test_the_log_names_the_run_and_links_to_its_runs_table(cfg, caplog):
    caplog.set_level("INFO", logger="adaptive_quant.tracking")
    tracking.name_runs_after("configs/smoke.yaml", ["train.epochs=2"])
    run_id = _seeded_run(cfg, "train")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("MLflow run 'train-smoke-epochs=2-") and run_id in line for line in lines), lines
    (ui,) = [line for line in lines if line.startswith("MLflow UI:")]
    assert f"/runs/{run_id}?workflowType=machine_learning" in ui and "mlflow ui --backend-store-uri sqlite:" in ui
