"""MLflow at the edge: where runs go, and a small tracker the pipeline logs through.

Default store: a local SQLite file (`sqlite:///mlruns.db`) with a file artifact root;
`MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) points elsewhere, e.g. a shared server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adaptive_quant.config import TrackingConfig

log = logging.getLogger(__name__)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.default_uri


def git_commit(cwd: str | Path | None = None) -> str:
    """The current commit (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """Thin wrapper over an active MLflow run; a disabled tracker accepts and drops everything."""

    def __init__(self, run: Any | None) -> None:
        self._run = run

    @property
    def run_id(self) -> str | None:
        return self._run.info.run_id if self._run is not None else None

    def log_params(self, params: dict[str, Any]) -> None:
        if self._run is None:
            return
        import mlflow

        # MLflow caps a param value at 6000 characters; ours are short, str() keeps lists readable
        mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._run is None:
            return
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._run is None:
            return
        import mlflow

        mlflow.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._run is None:
            return
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def _ensure_experiment(name: str, uri: str, artifact_root: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # a SQLite store needs an explicit artifact root; keep it beside the database
        location = Path(artifact_root).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, run_name: str | None = None, run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or, with run_id, reopen) an MLflow run; yields a Tracker. Disabled config → no-op tracker."""
    if not cfg.enabled:
        yield Tracker(None)
        return
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp_id = _ensure_experiment(cfg.experiment, uri, cfg.artifact_root)
    log.info("MLflow tracking at %s (experiment '%s')", uri, cfg.experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or cfg.run_name, run_id=run_id) as run:
        yield Tracker(run)
