"""versions.json: the roll-out index of a model repository (which version serves, which is the canary).

Versions are immutable, Triton's way: `<triton_name>/<N>/model.onnx`, `router/<N>/`, `manifests/<N>.json`.
This module holds the index (pure data), its atomic file I/O, and the transitions of a roll-out as pure
functions that return a new index or raise ValueError saying what is wrong and what is allowed. The file
work on a repository (copying a staged export in as version N) lives in export/versions.py.

A repository written before versions has no versions.json: it reads as one implicit version
(manifest.json's `version`, default 1), serving, whose manifest is manifest.json itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from adaptive_quant.core.manifest import MANIFEST_NAME, Manifest, ManifestError, manifest_from_dict

INDEX_NAME = "versions.json"
MANIFESTS_DIR = "manifests"
INDEX_SCHEMA_VERSION = 1
EVENTS = ("added", "canary", "promoted", "rolled_back")


class VersionState(StrEnum):
    STAGED = "staged"  # added, not serving traffic
    CANARY = "canary"  # serving a share of requests and mirrored samples
    SERVING = "serving"  # serving every other request
    RETIRED = "retired"  # served once; its files stay (a rollback may bring it back)
    FAILED = "failed"  # refused by the canary: never serves again


@dataclass(frozen=True)
class VersionRecord:
    version: int
    state: VersionState
    manifest: str  # relative to the repository root: "manifests/2.json" ("manifest.json" for the implicit one)
    added_at: str  # UTC, "2026-12-03T13:51:08Z"
    source: str = ""  # where it came from (the staged folder an operator named)
    detail: str = ""  # why it failed or was retired, with the figures


@dataclass(frozen=True)
class Canary:
    version: int
    share: float  # of requests served by the canary, 0..1
    mirror_share: float  # of the serving version's requests also run on the canary, 0..1
    started_at: str


@dataclass(frozen=True)
class VersionIndex:
    serving: int
    canary: Canary | None
    versions: dict[int, VersionRecord]
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # {"at", "event", "version", "detail"}

    def live(self) -> list[int]:
        """The versions that take traffic: [serving] or [serving, canary]."""
        return [self.serving] if self.canary is None else [self.serving, self.canary.version]

    def next_version(self) -> int:
        """One above every version this index has ever named (numbers are never reused)."""
        named = set(self.versions) | {self.serving} | {int(h["version"]) for h in self.history}
        if self.canary is not None:
            named.add(self.canary.version)
        return max(named, default=0) + 1

    def state_of(self, version: int) -> VersionState | None:
        record = self.versions.get(version)
        return None if record is None else record.state


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def version_manifest_path(version: int) -> str:
    """Where version N's manifest lives, relative to the repository root."""
    return f"{MANIFESTS_DIR}/{version}.json"


# ---- file I/O ---------------------------------------------------------------------------------


def implicit_index(repo: str | Path) -> VersionIndex:
    """The index of a repository without versions.json: manifest.json's version, serving."""
    path = Path(repo) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(
            f"{path} does not exist: {repo} is not a model repository (no {INDEX_NAME} either)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    version = int(data.get("version", 1))
    at = str(data.get("created_at", ""))
    record = VersionRecord(version, VersionState.SERVING, MANIFEST_NAME, at, detail=f"no {INDEX_NAME}: one version")
    event = {"at": at, "event": "promoted", "version": version, "detail": "the repository's first version"}
    return VersionIndex(serving=version, canary=None, versions={version: record}, history=(event,))


def index_to_dict(index: VersionIndex) -> dict[str, Any]:
    return {
        "schema_version": INDEX_SCHEMA_VERSION,
        "serving": index.serving,
        "canary": None if index.canary is None else asdict(index.canary),
        "versions": {str(v): {**asdict(r), "state": r.state.value} for v, r in sorted(index.versions.items())},
        "history": [dict(h) for h in index.history],
    }


def index_from_dict(data: dict[str, Any]) -> VersionIndex:
    try:
        if data.get("schema_version") != INDEX_SCHEMA_VERSION:
            raise ManifestError(
                f"{INDEX_NAME} schema_version {data.get('schema_version')!r}; this code reads {INDEX_SCHEMA_VERSION}"
            )
        versions = {}
        for key, rec in data["versions"].items():
            record = VersionRecord(**{**rec, "state": VersionState(rec["state"])})
            if record.version != int(key):
                raise ManifestError(f"{INDEX_NAME}: entry {key!r} describes version {record.version}")
            versions[record.version] = record
        canary = None if data.get("canary") is None else Canary(**data["canary"])
        index = VersionIndex(
            serving=int(data["serving"]),
            canary=canary,
            versions=versions,
            history=tuple(dict(h) for h in data.get("history", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{INDEX_NAME} is malformed: {exc!r}") from exc
    if index.serving not in index.versions:
        raise ManifestError(f"{INDEX_NAME}: serving version {index.serving} has no entry")
    if index.canary is not None and index.state_of(index.canary.version) != VersionState.CANARY:
        raise ManifestError(f"{INDEX_NAME}: canary {index.canary.version} is not in state canary")
    return index


def read_index(repo: str | Path) -> VersionIndex:
    """<repo>/versions.json, or the implicit one-version index when there is none."""
    path = Path(repo) / INDEX_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return implicit_index(repo)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return index_from_dict(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never part of one:
    a temporary file in the same folder (same file system), flushed and fsynced, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the gateway may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_index(repo: str | Path, index: VersionIndex) -> None:
    """<repo>/versions.json, atomically (a polling gateway never reads half of it)."""
    write_text_atomic(Path(repo) / INDEX_NAME, json.dumps(index_to_dict(index), indent=2) + "\n")


_held_locks = threading.local()  # .repos: the repositories this thread holds index_lock on


@contextmanager
def index_lock(repo: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the repository's index while reading, changing and writing it, so two
    writers (an export and a roll-out) never pick the same version number or lose each other's change.
    Readers (gateways) need no lock: write_index is atomic. Re-entrant in one thread (add_version inside
    a caller's lock); other threads and processes wait."""
    key = str(Path(repo).resolve())
    held: set[str] = _held_locks.__dict__.setdefault("repos", set())
    if key in held:
        yield
        return
    fd = os.open(key, os.O_RDONLY)  # the folder itself: no lock file left in the repository
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)  # closing releases the lock


def index_stamp(repo: str | Path) -> tuple[int, int, int] | None:
    """(st_ino, st_mtime_ns, st_size) of versions.json, None when there is none: cheap to poll for a
    change. The inode changes with every write (write_index replaces the file), so two writes within
    one timestamp tick that leave the same size are still told apart."""
    try:
        st = os.stat(Path(repo) / INDEX_NAME)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_version_manifest(repo: str | Path, version: int) -> Manifest:
    """Version N's manifest: manifests/<N>.json, or manifest.json when it is the implicit version N."""
    repo = Path(repo)
    path = repo / version_manifest_path(version)
    if not path.is_file():
        path = repo / MANIFEST_NAME
        if not path.is_file() or int(json.loads(path.read_text()).get("version", 1)) != version:
            have = sorted(int(p.stem) for p in (repo / MANIFESTS_DIR).glob("*.json") if p.stem.isdigit())
            raise ManifestError(f"{repo} has no manifest for version {version} (versions with one: {have or 'none'})")
    try:
        manifest = manifest_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.version != version:
        raise ManifestError(f"{path} describes version {manifest.version}, not {version}")
    return manifest


# ---- pure transitions -------------------------------------------------------------------------


def _event(at: str, event: str, version: int, detail: str) -> dict[str, Any]:
    return {"at": at, "event": event, "version": version, "detail": detail}


def _with_states(index: VersionIndex, changes: dict[int, tuple[VersionState, str | None]]) -> dict[int, VersionRecord]:
    versions = dict(index.versions)
    for v, (state, detail) in changes.items():
        rec = versions[v]
        versions[v] = replace(rec, state=state, detail=rec.detail if detail is None else detail)
    return versions


def _states(index: VersionIndex) -> str:
    return ", ".join(f"{v} {r.state.value}" for v, r in sorted(index.versions.items())) or "none"


def with_added(index: VersionIndex, record: VersionRecord) -> VersionIndex:
    """The index with `record` (a new, staged version numbered at or above next_version())."""
    if record.version in index.versions:
        raise ValueError(
            f"version {record.version} exists already (state {index.versions[record.version].state.value}); "
            f"version numbers are never reused: the next is {index.next_version()}"
        )
    if record.version < index.next_version():
        raise ValueError(
            f"version {record.version} is below a version this repository named before; "
            f"add {index.next_version()} or above"
        )
    if record.state != VersionState.STAGED:
        raise ValueError(f"a version is added as staged, not {record.state.value}; make it canary or serving after")
    versions = {**index.versions, record.version: record}
    history = (*index.history, _event(record.added_at, "added", record.version, record.source))
    return replace(index, versions=versions, history=history)


def with_canary(index: VersionIndex, version: int, share: float, mirror_share: float, now: str) -> VersionIndex:
    """Staged `version` becomes the canary, taking `share` of requests and `mirror_share` mirrored."""
    if index.canary is not None:
        raise ValueError(
            f"version {index.canary.version} is the canary already; promote or roll it back before canarying {version}"
        )
    state = index.state_of(version)
    if state != VersionState.STAGED:
        staged = [v for v, r in sorted(index.versions.items()) if r.state == VersionState.STAGED]
        what = "does not exist" if state is None else f"is {state.value}"
        raise ValueError(f"version {version} {what}; only a staged version can become the canary (staged: {staged})")
    for name, value in (("share", share), ("mirror_share", mirror_share)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"canary {name} {value} is outside 0..1 (a share of requests)")
    versions = _with_states(index, {version: (VersionState.CANARY, None)})
    canary = Canary(version=version, share=float(share), mirror_share=float(mirror_share), started_at=now)
    history = (*index.history, _event(now, "canary", version, f"share {share:g}, mirror share {mirror_share:g}"))
    return replace(index, canary=canary, versions=versions, history=history)


def made_serving(index: VersionIndex, version: int, now: str, detail: str) -> VersionIndex:
    """Staged `version` serves at once, without a canary (aq-export into a serving repository);
    the old serving version is retired. Recorded as 'promoted'."""
    if index.canary is not None:
        raise ValueError(
            f"version {index.canary.version} is the canary; promote or roll it back before version {version} serves"
        )
    state = index.state_of(version)
    if state != VersionState.STAGED:
        what = "does not exist" if state is None else f"is {state.value}"
        raise ValueError(
            f"version {version} {what}; only a staged version can be made serving (states: {_states(index)})"
        )
    old = index.serving
    versions = _with_states(
        index, {old: (VersionState.RETIRED, f"replaced by version {version}"), version: (VersionState.SERVING, "")}
    )
    history = (*index.history, _event(now, "promoted", version, detail))
    return replace(index, serving=version, versions=versions, history=history)


def promoted(index: VersionIndex, now: str, detail: str) -> VersionIndex:
    """The canary becomes the serving version; the old serving version is retired."""
    if index.canary is None:
        raise ValueError(f"there is no canary to promote (serving {index.serving}; versions: {_states(index)})")
    new, old = index.canary.version, index.serving
    versions = _with_states(
        index, {old: (VersionState.RETIRED, f"replaced by version {new}"), new: (VersionState.SERVING, "")}
    )
    history = (*index.history, _event(now, "promoted", new, detail))
    return replace(index, serving=new, canary=None, versions=versions, history=history)


def serving_lineage(index: VersionIndex) -> list[int]:
    """The versions that served, oldest first, with those rolled back removed: the last is serving,
    the one before it is what a rollback without a canary brings back."""
    stack: list[int] = []
    for h in index.history:
        v = int(h["version"])
        if h["event"] == "promoted":
            stack.append(v)
        elif h["event"] == "rolled_back" and stack and stack[-1] == v:
            stack.pop()  # a rolled-back serving version (a rolled-back canary never served)
    return stack


def rolled_back(index: VersionIndex, now: str, detail: str) -> VersionIndex:
    """With a canary: the canary fails (detail = why, with the figures); the serving version keeps serving.
    Without: the serving version is retired and the version that served before it serves again."""
    if index.canary is not None:
        v = index.canary.version
        versions = _with_states(index, {v: (VersionState.FAILED, detail)})
        history = (*index.history, _event(now, "rolled_back", v, detail))
        return replace(index, canary=None, versions=versions, history=history)
    lineage = serving_lineage(index)
    if len(lineage) < 2 or lineage[-1] != index.serving:
        raise ValueError(
            f"there is no canary, and no version served before version {index.serving} to go back to "
            f"(versions: {_states(index)})"
        )
    back = lineage[-2]
    if index.state_of(back) != VersionState.RETIRED:
        raise ValueError(
            f"version {back} served before {index.serving} but is {index.state_of(back)}; only a retired version "
            "can serve again"
        )
    old = index.serving
    versions = _with_states(
        index,
        {old: (VersionState.RETIRED, f"rolled back: {detail}"), back: (VersionState.SERVING, "")},
    )
    history = (*index.history, _event(now, "rolled_back", old, f"{detail}; version {back} serves again"))
    return replace(index, serving=back, versions=versions, history=history)
