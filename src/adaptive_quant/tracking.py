"""MLflow at the edge: where runs go, what they are called, and a small tracker the pipeline logs through.

Default store: a local SQLite file (`sqlite:///mlruns.db`) with a file artifact root;
`MLFLOW_TRACKING_URI` (or `tracking.tracking_uri`) points elsewhere, e.g. a shared server.

Run names say what ran, so that runs can be told apart in the UI's runs table:
`<kind>-<config>[-<overrides>]-<UTC yyyymmdd-HHMMSS>`, e.g. `train-default-epochs=5-20261201-201507`
(`tracking.run_name` replaces it). MLflow's own generated names ("capable-auk-759") come from
Python's `random`, which training seeds, so every seeded run would get the same one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adaptive_quant.config import TrackingConfig

log = logging.getLogger(__name__)

# How MLflow 3 declares an experiment's kind: "custom_model_development" is model training (runs,
# metrics, models), as opposed to GenAI development (traces). The 3.17.2 UI does not read it yet: it
# shows what its sidebar switch says (see UI_QUERY); mlflow/mlflow#24498 asks it to follow the tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

_MAX_LABEL = 60  # characters of "<config>[-<overrides>]" in a run name; the UI's name column is narrow
_MAX_VALUE = 16  # characters of one override's value
_DROPPED = re.compile(r"['\"]|(?<=,)\s+")  # quotes, and spaces after commas ([32, 64] → [32,64])
_UNSAFE = re.compile(r"[^\w.,=+\-\[\]]+")  # spaces, slashes, colons, ...: "_" (a run name stays one token)
# overrides that say where a run is logged, not what it is: left out of the name
_IGNORED_PREFIXES = ("tracking.",)
# overrides that say where outputs go: named last, so that what changed the run shows first in the
# UI's narrow run-name column (about 24 characters before it is cut)
_LAST_KEYS = ("output_dir",)
# the MLflow 3.17 UI opens an experiment on its GenAI overview unless the link says otherwise: its
# sidebar switch (GenAI / Model training) lives in the browser only, default GenAI
UI_QUERY = "?workflowType=machine_learning"

# "<config>[-<overrides>]" of the command line this process was started with; see name_runs_after
_invocation_label: str | None = None


def describe_overrides(overrides: Sequence[str]) -> str:
    """["train.epochs=5", "qat.epochs=1"] → "train.epochs=5,qat.epochs=1"; ["train.lr=0.1"] → "lr=0.1".

    A key is shortened to its last part unless another override ends the same way; a path value to
    its last part; a long value is cut. `tracking.*` overrides are left out.
    """
    pairs = []
    for item in overrides:
        key, _, value = item.partition("=")
        key, value = key.strip(), _DROPPED.sub("", value)
        if not key or key.startswith(_IGNORED_PREFIXES):
            continue
        if "/" in value:
            value = Path(value).name or value
        pairs.append((key, value[:_MAX_VALUE]))
    pairs.sort(key=lambda kv: kv[0] in _LAST_KEYS)  # stable: the others keep the command line's order
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    parts = [f"{short if last.count(short) == 1 else key}={value}" for (key, value), short in zip(pairs, last)]
    return ",".join(parts)


def run_label(config: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """The "<config>[-<overrides>]" part of a run name: configs/default.yaml + train.epochs=5 → default-epochs=5."""
    parts = [Path(config).stem] if config else []
    if described := describe_overrides(overrides):
        parts.append(described)
    label = _UNSAFE.sub("_", _DROPPED.sub("", "-".join(parts)))
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "~"


def name_runs_after(config: str | Path | None, overrides: Sequence[str] = ()) -> None:
    """Name the MLflow runs this process starts after its command line (the CLI entry points call this).

    config: the config file (its stem is used) or, for an export, the checkpoint's run folder.
    """
    global _invocation_label
    _invocation_label = run_label(config, overrides) or None


def make_run_name(kind: str, label: str | None = None, now: dt.datetime | None = None) -> str:
    """A run's name: kind "train", label "default-epochs=5" → "train-default-epochs=5-20261201-201507" (UTC)."""
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (_UNSAFE.sub("_", kind), label, stamp) if p)


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


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_link(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page for a run (or an experiment), opened as model training, not GenAI.

    A tracking server's own address; for a local store (sqlite:, file:) the address `mlflow ui` serves.
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}{UI_QUERY}"


def _ensure_experiment(name: str, uri: str, artifact_root: str) -> str:
    """The experiment's id, created if needed, tagged as a model-training experiment (see EXPERIMENT_KIND)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        # an experiment made before the tag existed gets it; a kind someone chose in the UI is kept
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # a SQLite store needs an explicit artifact root; keep it beside the database
        location = Path(artifact_root).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def _unused_name(exp_id: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when a run in the experiment already has it (same kind, config, second)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    candidate = name
    for n in range(2, 100):
        if not client.search_runs([exp_id], filter_string=f"attributes.run_name = '{candidate}'", max_results=1):
            return candidate
        candidate = f"{name}-{n}"
    return candidate


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, kind: str, run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or, with run_id, reopen) an MLflow run; yields a Tracker. Disabled config → no-op tracker.

    kind: what the run does ("train", "export", "evaluate-in-process", "evaluate-http"); it starts the run's
    name, followed by this process's command line (see name_runs_after) and the UTC time.
    """
    if not cfg.enabled:
        yield Tracker(None)
        return
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp_id = _ensure_experiment(cfg.experiment, uri, cfg.artifact_root)
    name = None
    if run_id is None:  # a reopened run keeps its name
        name = cfg.run_name or _unused_name(exp_id, make_run_name(kind, _invocation_label))
    with mlflow.start_run(experiment_id=exp_id, run_name=name, run_id=run_id) as run:
        log.info("MLflow run '%s' (%s) at %s, experiment '%s'", run.info.run_name, run.info.run_id, uri, cfg.experiment)
        if uri.startswith(("http://", "https://")):
            log.info("MLflow UI: %s", ui_link(uri, exp_id, run.info.run_id))
        else:
            log.info(
                "MLflow UI: `mlflow ui --backend-store-uri %s`, then %s", uri, ui_link(uri, exp_id, run.info.run_id)
            )
        yield Tracker(run)
