"""File work on a serving model repository: a staged export becomes version N, Triton's way.

A staged repository is what aq-export writes into a fresh folder (`<triton_name>/1/model.onnx`, router/1/,
manifest.json). add_version copies it into the serving repository as the next version:

    <triton_name>/<N>/model.onnx   (+ model.py in a python-flavoured repository)
    router/<N>/deferral.{npz,json}
    router/<N>/speed/deferral.{npz,json}   the cheap entry's router, when the manifest has one
    manifests/<N>.json             version=N, paths rewritten; written once, never changed
    versions.json                  N recorded as staged (core/versions.py)

Files of a version that may be serving are never overwritten: every file is written under a temporary
folder beside the repository, its sha256 checked against the staged manifest, and the version folders
renamed into place only when all of them are complete; a refused copy leaves no folder of N behind.
Which versions Triton keeps loaded is each config.pbtxt's `version_policy` (set_version_policy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from adaptive_quant.core.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    load_manifest,
    manifest_from_dict,
    save_manifest,
    sha256_file,
)
from adaptive_quant.core.versions import (
    INDEX_NAME,
    MANIFESTS_DIR,
    VersionIndex,
    VersionRecord,
    VersionState,
    index_lock,
    load_version_manifest,
    made_serving,
    read_index,
    utc_now,
    version_manifest_path,
    with_added,
    write_index,
    write_text_atomic,
)
from adaptive_quant.export.triton_config import with_version_policy
from adaptive_quant.export.triton_python import link_or_copy, python_config, write_model_py

log = logging.getLogger(__name__)

CONFIG_NAME = "config.pbtxt"
ROUTER_DIR = "router"
ROUTER_FILES = ("path", "spec_path")  # the manifest's router entries that name a file
# the manifest's routers (attribute → sub-folder of router/<N>/): the main one, and the cheap entry's
ROUTERS = {"router": "", "speed_router": "speed"}


def router_entries(manifest: Manifest) -> list[tuple[str, dict]]:
    """(attribute, entry) of each router the manifest names: the main one, then the speed router."""
    return [(attr, getattr(manifest, attr)) for attr in ROUTERS if getattr(manifest, attr, None)]


def router_path(version: int, attr: str, name: str) -> str:
    """Where version N keeps a router file: router/<N>/<name>, the speed router's router/<N>/speed/<name>."""
    return "/".join(p for p in (ROUTER_DIR, str(version), ROUTERS[attr], name) if p)


class VersionError(ValueError):
    """A staged repository cannot become a version of the serving one (missing or damaged file, taken number)."""


# ---- Triton's config.pbtxt (the text edits: export/triton_config.py) ----------------------------


def model_dirs(repo: Path) -> list[Path]:
    """Every Triton model folder of the repository (one with a config.pbtxt)."""
    return sorted(p.parent for p in repo.glob(f"*/{CONFIG_NAME}") if not p.parent.name.startswith("."))


def is_python_flavoured(repo: Path) -> bool:
    return any(re.search(r'backend\s*:\s*"python"', (d / CONFIG_NAME).read_text()) for d in model_dirs(repo))


def set_version_policy(serving: str | Path, versions: list[int]) -> None:
    """Every Triton model's config.pbtxt lists `versions` (those of them it has a folder for) as the ones
    to keep loaded. A model holding none of them (a variant only older versions had) is left as it is."""
    serving = Path(serving)
    for d in model_dirs(serving):
        present = [v for v in sorted(set(versions)) if (d / str(v)).is_dir()]
        if not present:
            log.info("%s holds none of versions %s: its version policy is left as it is", d.name, versions)
            continue
        path = d / CONFIG_NAME
        text = path.read_text()
        new = with_version_policy(text, present)
        if new != text:
            write_text_atomic(path, new)


# ---- manifests --------------------------------------------------------------------------------


def publish_manifest(serving: str | Path, version: int) -> None:
    """manifests/<N>.json becomes manifest.json (atomically): what every reader of the repository sees."""
    serving = Path(serving)
    text = (serving / version_manifest_path(version)).read_text()
    if manifest_from_dict(json.loads(text)).version != version:
        raise ManifestError(f"{serving / version_manifest_path(version)} does not describe version {version}")
    write_text_atomic(serving / MANIFEST_NAME, text)


def _write_once(path: Path, text: str) -> None:
    if path.exists():
        raise VersionError(f"{path} exists already: a version's manifest is written once, never changed")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _rewritten(manifest: Manifest, version: int) -> Manifest:
    """The manifest of version N: every file path under <triton_name>/<N>/ and router/<N>/."""
    m = dataclasses.replace(manifest, version=version, variants=dict(manifest.variants))
    for k, v in m.variants.items():
        m.variants[k] = dataclasses.replace(v, path=f"{v.triton_name}/{version}/{Path(v.path).name}")
    for attr, entry in router_entries(m):
        entry = dict(entry)
        for key in ROUTER_FILES:
            if entry.get(key):
                entry[key] = router_path(version, attr, Path(entry[key]).name)
        setattr(m, attr, entry)
    return m


def initialise_versions(repo: str | Path, source: str = "") -> VersionIndex:
    """Make a fresh export (one version, manifest.json) a versioned repository: manifests/<N>.json,
    versions.json with N serving, and each config.pbtxt's version policy [N]."""
    repo = Path(repo)
    manifest = load_manifest(repo)
    n = manifest.version
    _write_once(repo / version_manifest_path(n), manifest.to_json() + "\n")
    now = manifest.created_at or utc_now()
    record = VersionRecord(n, VersionState.SERVING, version_manifest_path(n), now, source=source)
    history = (
        {"at": now, "event": "added", "version": n, "detail": source},
        {"at": now, "event": "promoted", "version": n, "detail": "the repository's first version"},
    )
    index = VersionIndex(serving=n, canary=None, versions={n: record}, history=history)
    write_index(repo, index)
    publish_manifest(repo, n)  # manifest.json: a byte copy of manifests/<N>.json
    set_version_policy(repo, [n])
    return index


def _materialised(serving: Path, index: VersionIndex) -> VersionIndex:
    """An implicit index (no versions.json) with manifests/<old>.json written, so that every version
    has its own manifest before manifest.json moves on."""
    if (serving / INDEX_NAME).is_file():
        return index
    old = index.serving
    path = serving / version_manifest_path(old)
    if not path.is_file():  # (an earlier, failed add may have written it already: the same text)
        _write_once(path, load_version_manifest(serving, old).to_json() + "\n")
    record = dataclasses.replace(index.versions[old], manifest=version_manifest_path(old), detail="")
    return dataclasses.replace(index, versions={**index.versions, old: record})


# ---- version N --------------------------------------------------------------------------------


def highest_version_on_disk(serving: Path) -> int:
    """The highest version number any folder or manifest of the repository uses (0: none)."""
    numbers = [0]
    for d in [*model_dirs(serving), serving / ROUTER_DIR]:
        if d.is_dir():
            numbers += [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    numbers += [int(p.stem) for p in (serving / MANIFESTS_DIR).glob("*.json") if p.stem.isdigit()]
    return max(numbers)


def _place_file(src: Path, dst: Path, expected_sha: str, what: str, reuse: dict[str, Path]) -> None:
    """dst = the bytes of src, checked against `expected_sha` after the copy. A file of the serving
    repository with the same sha256 (`reuse`) is hard-linked instead: both are immutable."""
    if not src.is_file():
        raise VersionError(f"{what}: {src} is missing; nothing was added")
    got = sha256_file(src)
    if got != expected_sha:
        raise VersionError(
            f"{what}: {src} has sha256 {got[:12]}…, its manifest says {expected_sha[:12]}… "
            "(damaged or replaced after the export); nothing was added"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    linked = False
    if expected_sha in reuse:
        try:
            os.link(reuse[expected_sha], dst)
            linked = True
        except OSError:  # another file system, or links not allowed: copy
            pass
    if not linked:
        # copied, never linked to the staged file: the staged folder stays the operator's to change
        shutil.copyfile(src, dst)
    got = sha256_file(dst)
    if got != expected_sha:  # the copy itself went wrong (disk full, a file changed while copied)
        raise VersionError(
            f"{what}: the copy {dst} has sha256 {got[:12]}…, not {expected_sha[:12]}…; nothing was added"
        )


def _serving_files(serving: Path, index: VersionIndex) -> dict[str, Path]:
    """sha256 → file of the serving version (what a new version with the same bytes may link to)."""
    try:
        manifest = load_version_manifest(serving, index.serving)
    except ManifestError:
        return {}
    files = [serving / v.path for v in manifest.variants.values()]
    files += [serving / entry[k] for _, entry in router_entries(manifest) for k in ROUTER_FILES if entry.get(k)]
    return {sha256_file(f): f for f in files if f.is_file()}


def _add_version(staged: Path, serving: Path, source: str) -> tuple[int, Manifest, VersionIndex]:
    """add_version's work; the caller holds the index lock."""
    staged_manifest = load_manifest(staged)
    index = read_index(serving)
    n = max(index.next_version(), highest_version_on_disk(serving) + 1)
    python = is_python_flavoured(serving)
    if python:  # as write_python_flavor: no Triton model serves a baseline
        served = {k: v for k, v in staged_manifest.variants.items() if v.served}
        staged_manifest = dataclasses.replace(staged_manifest, variants=served)
    new = _rewritten(staged_manifest, n)
    reuse = _serving_files(serving, index)
    work = Path(tempfile.mkdtemp(prefix=f".{serving.name}.version-{n}-", dir=serving.parent))
    placed: list[Path] = []  # what this call created in `serving`, removed again on failure
    index_written = False
    try:
        for k, v in staged_manifest.variants.items():
            dst_rel = new.variants[k].path
            _place_file(staged / v.path, work / dst_rel, v.sha256, f"variant {k}", reuse)
            if python:
                write_model_py((work / dst_rel).parent)  # with its .pyc: Triton reloads a folder whose files change
        for attr, entry in router_entries(staged_manifest):
            what = "router" if attr == "router" else "speed router"
            for key in ROUTER_FILES:
                rel = entry.get(key)
                if not rel:
                    continue
                src = staged / rel
                # the weights carry their sha256 in the manifest; the spec is checked against itself
                expected = entry["sha256"] if key == "path" else _sha_or_missing(src, f"{what} spec")
                _place_file(src, work / getattr(new, attr)[key], expected, f"{what} {key}", reuse)
        _write_once(serving / version_manifest_path(n), new.to_json() + "\n")
        placed.append(serving / version_manifest_path(n))
        # a repository made before versions has configs without a policy (Triton: the latest version):
        # pin what serves now before version N's folders appear
        set_version_policy(serving, index.live())
        # the <model>/<N> folders (model.py's __pycache__ moves inside its version folder)
        version_dirs = {work.joinpath(*p.relative_to(work).parts[:2]) for p in work.rglob("*") if p.is_file()}
        for version_dir in sorted(version_dirs):
            target = serving / version_dir.relative_to(work)
            if target.exists():
                raise VersionError(f"{target} exists already: version {n}'s files are never written over")
            if not target.parent.exists():  # a Triton model the serving repository lacks (or router/)
                target.parent.mkdir(parents=True)
                placed.append(target.parent)
            version_dir.rename(target)
            placed.append(target)
        for v in staged_manifest.variants.values():
            model = serving / v.triton_name
            if not (model / CONFIG_NAME).is_file():  # a Triton model the serving repository lacks
                text = _new_config(staged, v.triton_name, new, python)
                write_text_atomic(model / CONFIG_NAME, with_version_policy(text, [n]))
        record = VersionRecord(n, VersionState.STAGED, version_manifest_path(n), utc_now(), source=source)
        index = with_added(_materialised(serving, index), record)
        write_index(serving, index)
        index_written = True
    except BaseException:
        for target in reversed(placed if not index_written else []):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("added %s to %s as version %d (staged)", staged, serving, n)
    return n, new, index


def _sha_or_missing(path: Path, what: str) -> str:
    if not path.is_file():
        raise VersionError(f"{what}: {path} is missing")
    return sha256_file(path)


def _new_config(staged: Path, name: str, manifest: Manifest, python: bool) -> str:
    src = staged / name / CONFIG_NAME
    text = src.read_text() if src.is_file() else ""
    if not python:
        if not text:
            raise VersionError(f"{src} is missing: the staged repository has no Triton config for {name}")
        return text
    return python_config(
        name, text, manifest.input_name, manifest.output_name, manifest.image_size, len(manifest.classes)
    )


def add_version(staged: str | Path, serving: str | Path, source: str = "") -> tuple[int, Manifest]:
    """Copy the staged repository into `serving` as the next version N, recorded as staged in versions.json.

    Refuses (VersionError, nothing of N left behind) a missing file or one whose sha256 is not its
    manifest's. Returns (N, version N's manifest, paths relative to `serving`).
    """
    staged, serving = Path(staged).resolve(), Path(serving).resolve()
    if staged == serving:
        raise VersionError(f"the staged repository must be another folder than the serving one ({serving})")
    with index_lock(serving):
        n, manifest, _ = _add_version(staged, serving, source or str(staged))
    return n, manifest


def add_serving_version(
    staged: str | Path, serving: str | Path, source: str = "", detail: str = ""
) -> tuple[int, Manifest]:
    """add_version, then version N serves at once (no canary): the old serving version is retired,
    manifest.json becomes N's and Triton's policy [N]. What aq-export into a serving repository does."""
    staged, serving = Path(staged).resolve(), Path(serving).resolve()
    if staged == serving:
        raise VersionError(f"the staged repository must be another folder than the serving one ({serving})")
    with index_lock(serving):
        canary = read_index(serving).canary
        if canary is not None:  # refused before anything is copied
            raise VersionError(
                f"version {canary.version} of {serving} is a canary: promote or roll it back (aq-rollout --promote "
                "| --rollback) before exporting into it"
            )
        n, manifest, index = _add_version(staged, serving, source or str(staged))
        old = index.serving
        # both stay in Triton's policy: the gateways load N (load_model applies the policy) while
        # some still serve `old`; a policy of [N] alone would unload `old` under their requests.
        # The next roll-out's policy (its live versions) lets `old` go.
        set_version_policy(serving, [old, n])
        write_index(serving, made_serving(index, n, utc_now(), detail or f"exported from {source or staged}"))
        publish_manifest(serving, n)
    log.info(
        "version %d of %s serves (version %d retired; Triton keeps both loaded until the next roll-out)",
        n,
        serving,
        old,
    )
    return n, manifest


def stage_serving_version(serving: str | Path, work: str | Path) -> Manifest:
    """Write the serving version of `serving` into `work` as a staged repository (version-1 layout,
    files hard-linked: nothing in `work` may be written over), to change and add back as a new version."""
    serving, work = Path(serving), Path(work)
    manifest = load_manifest(serving)
    staged = _rewritten(manifest, 1)
    for k, v in manifest.variants.items():
        dst = work / staged.variants[k].path
        link_or_copy(serving / v.path, dst)
        cfg = serving / v.triton_name / CONFIG_NAME
        if cfg.is_file() and not (work / v.triton_name / CONFIG_NAME).exists():
            shutil.copyfile(cfg, work / v.triton_name / CONFIG_NAME)
    for attr, entry in router_entries(manifest):
        for key in ROUTER_FILES:
            if entry.get(key):
                link_or_copy(serving / entry[key], work / getattr(staged, attr)[key])
    save_manifest(work, staged)
    return staged
