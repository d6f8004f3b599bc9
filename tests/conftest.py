"""Shared fixtures: one smoke training run per test session, reused by every test that needs a model.

The smoke run is the real pipeline (float → PT2E QAT → converted INT8, MLflow on SQLite) on
synthetic images, so the expensive part happens once (~30 s on 2 cores).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_config_path() -> Path:
    return ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, smoke_config_path: Path):
    """(config, TrainingResult, tracking uri) of one smoke training run in a temp folder."""
    from adaptive_quant.config import load_config
    from adaptive_quant.training.pipeline import run_training

    tmp = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    cfg = load_config(
        smoke_config_path,
        [f"output_dir={tmp / 'run'}", f"tracking.tracking_uri={uri}", f"tracking.artifact_root={tmp / 'artifacts'}"],
    )
    result = run_training(cfg)
    return cfg, result, uri


# a fast export: short latency profile, small PTQ calibration, no MLflow registry
EXPORT_FAST = dict(profile_seconds=0.05, profile_batch_sizes=[1, 8], ptq_calibration_images=64, register=False)


@pytest.fixture(scope="session")
def smoke_export(smoke_run, tmp_path_factory: pytest.TempPathFactory):
    """(repository, ExportResult) of the smoke run, exported once per session; copy it before changing it."""
    from adaptive_quant.config import ExportConfig
    from adaptive_quant.export.pipeline import build_repository

    _, result, _ = smoke_run
    repo = tmp_path_factory.mktemp("export") / "model_repository"
    out = build_repository(result.checkpoint, ExportConfig(repository=str(repo), **EXPORT_FAST), tracking=False)
    return repo, out


@pytest.fixture(autouse=True)
def _no_user_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # a developer's MLFLOW_TRACKING_URI must never receive test runs
    if "MLFLOW_TRACKING_URI" in os.environ:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
