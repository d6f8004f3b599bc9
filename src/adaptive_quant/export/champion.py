"""MLflow's `champion` alias follows the repository version that serves.

Each served variant is a registered model named after its Triton model (`cifar_resnet_int8`), as
export/pipeline.py registers them. On promotion of repository version N, the alias moves to a model
version for N: one tagged repository_version=N and sha256=<the file's sha256>, or a new one whose source
is the version's folder (`<repo>/<triton_name>/<N>`). The aliases it replaced are returned, so that a
rollback can move them back.

MLflow is the record, not the roll-out: any MLflow failure (no store, unreachable server) is a logged
warning and the caller carries on. The store is MLFLOW_TRACKING_URI, else the training's default
(tracking.resolve_tracking_uri); a local SQLite store that does not exist is not created.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from adaptive_quant.config import TrackingConfig
from adaptive_quant.core.manifest import Manifest
from adaptive_quant.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

ALIAS = "champion"
# a roll-out must not hang for minutes on a tracking server that is down (MLflow's own default
# retries with back-off for about two minutes); set before mlflow is imported, only when unset
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

Champions = dict[str, str | None]  # registered model name → model version holding the alias (None: none)


def tracking_uri() -> str:
    return resolve_tracking_uri(TrackingConfig())


def _client() -> Any | None:
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        log.warning("MLflow: no store at %s (set MLFLOW_TRACKING_URI); the %s alias is not moved", uri, ALIAS)
        return None
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _current(client: Any, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None  # no such alias (or no such registered model)


def _model_version_for(client: Any, name: str, folder: Path, version: int, sha256: str) -> str:
    """The model version tagged for repository version `version` and this file, made if there is none."""
    from mlflow.exceptions import MlflowException

    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        if tags.get("repository_version") == str(version) and tags.get("sha256") == sha256:
            return str(mv.version)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        source=str(folder.resolve()),
        tags={"repository_version": str(version), "sha256": sha256, "repository": str(folder.parent.parent.resolve())},
        description=f"repository version {version}",
    )
    return str(mv.version)


def promote_champion(repo: Path, manifest: Manifest, version: int) -> Champions | None:
    """Point `champion` of each served variant at repository version `version`; the aliases it replaced
    (None where there was none), or None when MLflow could not be used (logged)."""
    try:
        client = _client()
        if client is None:
            return None
        previous: Champions = {}
        for v in manifest.served_variants():
            folder = repo / v.triton_name / str(version)
            previous[v.triton_name] = _current(client, v.triton_name)
            mv = _model_version_for(client, v.triton_name, folder, version, v.sha256)
            client.set_registered_model_alias(v.triton_name, ALIAS, mv)
            log.info("MLflow: %s@%s → model version %s (was %s)", v.triton_name, ALIAS, mv, previous[v.triton_name])
        return previous
    except Exception as exc:  # MLflow is the record, never the roll-out
        log.warning("MLflow: the %s alias was not moved (%s: %s)", ALIAS, type(exc).__name__, exc)
        return None


def restore_champion(previous: Champions) -> bool:
    """Move each alias back to the model version it had (deleted where there was none); False on failure."""
    try:
        client = _client()
        if client is None:
            return False
        for name, mv in previous.items():
            if mv is None:
                try:
                    client.delete_registered_model_alias(name, ALIAS)
                except Exception:
                    pass  # nothing to delete
            else:
                client.set_registered_model_alias(name, ALIAS, mv)
            log.info("MLflow: %s@%s back to model version %s", name, ALIAS, mv)
        return True
    except Exception as exc:
        log.warning("MLflow: the %s alias was not moved back (%s: %s)", ALIAS, type(exc).__name__, exc)
        return False
