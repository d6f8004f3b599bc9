"""Immutable model versions in a repository (core/versions.py, export/versions.py): what an operator sees
on disk after adding versions, the refusals, the roll-out index and its transitions. No torch: the
repositories are tests/gateway_repo.py's tiny ONNX ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from adaptive_quant.core.manifest import load_manifest, save_manifest, sha256_file
from adaptive_quant.core.versions import (
    INDEX_NAME,
    VersionIndex,
    VersionRecord,
    VersionState,
    index_stamp,
    load_version_manifest,
    promoted,
    read_index,
    rolled_back,
    with_added,
    with_canary,
    write_index,
)
from adaptive_quant.export.triton_config import policy_versions, with_version_policy
from adaptive_quant.export.triton_python import write_python_flavor
from adaptive_quant.export.versions import (
    VersionError,
    add_serving_version,
    add_version,
    initialise_versions,
    set_version_policy,
)
from gateway_repo import MODEL, build_repo

NAMES = [f"{MODEL}_{p}" for p in ("fp32", "fp16", "int8")]
NOW = "2026-12-03T12:00:00Z"


def _with_router(repo: Path, seed: int) -> Path:
    """Give the repository a (stand-in) router under router/1/, as the export writes one."""
    router = repo / "router" / "1"
    router.mkdir(parents=True)
    np.savez(router / "deferral.npz", w=np.random.default_rng(seed).normal(size=(4, 3)))
    (router / "deferral.json").write_text(json.dumps({"features": ["p_top1"], "seed": seed}))
    m = load_manifest(repo)
    m.router = {
        "kind": "deferral_mlp",
        "entry": "int8",
        "path": "router/1/deferral.npz",
        "spec_path": "router/1/deferral.json",
        "sha256": sha256_file(router / "deferral.npz"),
    }
    save_manifest(repo, m)
    return repo


def _staged(root: Path, tag: str) -> Path:
    """A fresh export: the tiny repository with its networks re-saved (new bytes, new sha256s)."""
    repo = _with_router(build_repo(root), seed=len(tag))
    m = load_manifest(repo)
    for v in m.variants.values():
        model = onnx.load(str(repo / v.path))
        model.doc_string = f"re-saved {tag}"
        onnx.save(model, str(repo / v.path))
        v.sha256, v.size_bytes = sha256_file(repo / v.path), (repo / v.path).stat().st_size
    m.created_at = NOW
    save_manifest(repo, m)
    return repo


def _tree(repo: Path) -> dict[str, str]:
    """relative path → sha256 of every file of the repository."""
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in repo.rglob("*") if p.is_file()
    }


@pytest.fixture
def serving(tmp_path) -> Path:
    """A repository exported before versions: no versions.json, no version in manifest.json."""
    repo = _with_router(build_repo(tmp_path / "serving"), seed=0)
    data = json.loads((repo / "manifest.json").read_text())
    data.pop("version")
    (repo / "manifest.json").write_text(json.dumps(data))
    return repo


def test_an_old_repository_reads_as_version_1_serving(serving) -> None:
    index = read_index(serving)
    assert index.serving == 1 and index.canary is None and index.live() == [1]
    assert index.versions[1].state == VersionState.SERVING and index.next_version() == 2
    assert load_version_manifest(serving, 1).version == 1
    assert index_stamp(serving) is None  # nothing to poll yet
    with pytest.raises(ValueError, match="no manifest for version 2"):
        load_version_manifest(serving, 2)


def test_adding_versions_leaves_earlier_files_untouched(serving, tmp_path) -> None:
    before = _tree(serving)
    n2, m2 = add_version(_staged(tmp_path / "a", "a"), serving, source="export a")
    n3, m3 = add_version(_staged(tmp_path / "b", "b"), serving)
    assert (n2, n3) == (2, 3)
    after = _tree(serving)
    # every earlier file byte-identical, manifest.json too; config.pbtxt is Triton's, not a version's:
    # only its version_policy changed (below)
    assert {k: after[k] for k in before if not k.endswith("config.pbtxt")} == {
        k: h for k, h in before.items() if not k.endswith("config.pbtxt")
    }
    for n, m in ((2, m2), (3, m3)):
        assert m.version == n
        assert {v.path for v in m.variants.values()} == {f"{name}/{n}/model.onnx" for name in NAMES}
        assert (m.router["path"], m.router["spec_path"]) == (f"router/{n}/deferral.npz", f"router/{n}/deferral.json")
        assert load_version_manifest(serving, n) == m  # manifests/<N>.json
        for v in m.variants.values():
            assert sha256_file(serving / v.path) == v.sha256
        assert sha256_file(serving / m.router["path"]) == m.router["sha256"]
    assert m2.variants["int8"].sha256 != m3.variants["int8"].sha256  # two exports, two networks
    index = read_index(serving)
    assert index.serving == 1 and index.live() == [1]  # added is not serving
    states = {v: (r.state, r.manifest) for v, r in index.versions.items()}
    assert states == {
        1: (VersionState.SERVING, "manifests/1.json"),
        2: (VersionState.STAGED, "manifests/2.json"),
        3: (VersionState.STAGED, "manifests/3.json"),
    }
    assert index.versions[2].source == "export a"
    assert [h["event"] for h in index.history][-2:] == ["added", "added"]
    assert load_version_manifest(serving, 1).version == 1  # the old one got its own manifest
    assert load_manifest(serving, verify_files=True).version == 1  # readers of the repository see version 1
    for name in NAMES:  # Triton keeps loading version 1 only, though 2 and 3 lie beside it
        assert policy_versions((serving / name / "config.pbtxt").read_text()) == [1]
    assert not list(tmp_path.glob(".serving.*")), "no temporary folder left behind"


def test_a_serving_version_is_exported_over(serving, tmp_path) -> None:
    n, m = add_serving_version(_staged(tmp_path / "a", "a"), serving)
    assert n == 2
    assert (serving / "manifest.json").read_bytes() == (serving / "manifests/2.json").read_bytes()
    assert load_manifest(serving, verify_files=True).version == 2
    index = read_index(serving)
    assert index.serving == 2 and index.versions[1].state == VersionState.RETIRED
    # Triton keeps version 1 loadable while the gateways switch (a policy of [2] alone would unload
    # it under their requests); the next roll-out's policy lets it go
    for name in NAMES:
        assert policy_versions((serving / name / "config.pbtxt").read_text()) == [1, 2]
    n3, _ = add_serving_version(_staged(tmp_path / "b", "b"), serving)
    for name in NAMES:
        assert policy_versions((serving / name / "config.pbtxt").read_text()) == [2, n3]
    index = read_index(serving)
    back = rolled_back(index, NOW, "operator: p95 up")  # no canary: version 1 serves again
    assert back.serving == 2 and back.versions[n3].state == VersionState.RETIRED
    assert "p95 up" in back.versions[n3].detail


@pytest.mark.parametrize("damage", ["bytes", "missing", "router"])
def test_a_damaged_staged_file_is_refused_and_nothing_is_left(serving, tmp_path, damage) -> None:
    staged = _staged(tmp_path / "a", "a")
    if damage == "bytes":
        (staged / f"{MODEL}_int8/1/model.onnx").write_bytes(b"not the model")
    elif damage == "missing":
        (staged / f"{MODEL}_fp16/1/model.onnx").unlink()
    else:
        (staged / "router/1/deferral.npz").write_bytes(b"stale")
    before = _tree(serving)
    what = {"bytes": "variant int8.*sha256", "missing": "variant fp16.*missing", "router": "router path.*sha256"}
    with pytest.raises(VersionError, match=what[damage]):
        add_version(staged, serving)
    assert _tree(serving) == before  # no version folder, manifest or index written
    assert not any((serving / name / "2").exists() for name in [*NAMES, "router"])
    assert not list(tmp_path.glob(".serving.*")), "no temporary folder left behind"
    assert add_version(_staged(tmp_path / "b", "b"), serving)[0] == 2  # the number was not used up


def test_a_version_number_on_disk_is_never_reused(serving, tmp_path) -> None:
    (serving / f"{MODEL}_fp32" / "5").mkdir()  # a stray folder, e.g. from a copy by hand
    assert add_version(_staged(tmp_path / "a", "a"), serving)[0] == 6


def test_a_python_flavoured_repository_gets_model_py_in_each_new_version(serving, tmp_path) -> None:
    py = write_python_flavor(serving, tmp_path / "serving_python")
    n, m = add_version(_staged(tmp_path / "a", "a"), py)
    for v in m.variants.values():
        assert (py / v.path).parent.joinpath("model.py").is_file()
        assert sha256_file(py / v.path) == v.sha256
        config = text_format.Parse((py / v.triton_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "python" and list(config.version_policy.specific.versions) == [1]


def test_a_fresh_export_is_version_1_with_its_index(tmp_path) -> None:
    repo = build_repo(tmp_path / "fresh")
    index = initialise_versions(repo, source="runs/x/best.pt")
    assert read_index(repo) == index and index.serving == 1 and index.versions[1].manifest == "manifests/1.json"
    assert load_version_manifest(repo, 1) == load_manifest(repo)
    assert (repo / "manifest.json").read_bytes() == (repo / "manifests/1.json").read_bytes()
    for name in NAMES:
        assert (repo / name / "1" / "model.onnx").is_file()
        assert policy_versions((repo / name / "config.pbtxt").read_text()) == [1]


def test_the_version_policy_is_written_into_every_config_and_triton_still_parses_it(serving, tmp_path) -> None:
    add_version(_staged(tmp_path / "a", "a"), serving)
    parsed_before = {
        name: text_format.Parse((serving / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        for name in NAMES
    }
    set_version_policy(serving, [1, 2])
    set_version_policy(serving, [2, 1])  # replaced, not added twice; listed in order
    for name in NAMES:
        text = (serving / name / "config.pbtxt").read_text()
        assert text.count("version_policy") == 1
        config = text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema
        assert list(config.version_policy.specific.versions) == [1, 2]
        config.ClearField("version_policy")
        parsed_before[name].ClearField("version_policy")
        assert config == parsed_before[name]  # everything else kept
    set_version_policy(serving, [2, 7])  # a version a model has no folder for is not listed
    assert policy_versions((serving / NAMES[0] / "config.pbtxt").read_text()) == [2]


def test_a_multi_line_policy_is_replaced_whole() -> None:
    text = 'name: "m"\nversion_policy: {\n  latest { num_versions: 2 }\n}\nmax_batch_size: 8\n'
    new = with_version_policy(text, [3])
    config = text_format.Parse(new, model_config_pb2.ModelConfig())
    assert list(config.version_policy.specific.versions) == [3] and config.max_batch_size == 8
    assert "latest" not in new


def test_write_index_is_atomic_and_the_stamp_moves(serving) -> None:
    index = read_index(serving)
    write_index(serving, index)
    stamp = index_stamp(serving)
    assert stamp is not None and read_index(serving) == index
    assert sorted(p.name for p in serving.iterdir() if p.is_file()) == ["manifest.json", INDEX_NAME]
    staged = with_added(index, VersionRecord(2, VersionState.STAGED, "manifests/2.json", NOW))
    write_index(serving, with_canary(staged, 2, 0.1, 0.2, NOW))
    assert index_stamp(serving) != stamp
    assert read_index(serving).canary.share == 0.1
    # the same bytes written again (same size, maybe the same timestamp tick): still a new stamp
    before = index_stamp(serving)
    write_index(serving, read_index(serving))
    assert index_stamp(serving) != before
    assert [p.name for p in serving.iterdir() if p.name.endswith(".tmp")] == []


# ---- transitions ------------------------------------------------------------------------------


def _index_with(*staged: int) -> VersionIndex:
    """Version 1 serving, and `staged` versions added."""
    record = VersionRecord(1, VersionState.SERVING, "manifests/1.json", NOW)
    event = {"at": NOW, "event": "promoted", "version": 1, "detail": "first"}
    index = VersionIndex(serving=1, canary=None, versions={1: record}, history=(event,))
    for v in staged:
        index = with_added(index, VersionRecord(v, VersionState.STAGED, f"manifests/{v}.json", NOW))
    return index


def test_a_canary_is_promoted() -> None:
    index = with_canary(_index_with(2), 2, 0.1, 0.5, NOW)
    assert index.live() == [1, 2] and index.versions[2].state == VersionState.CANARY
    done = promoted(index, NOW, "agreement 99.4 % over 812 mirrored")
    assert done.serving == 2 and done.canary is None and done.live() == [2]
    assert (done.versions[1].state, done.versions[2].state) == (VersionState.RETIRED, VersionState.SERVING)
    assert done.history[-1] == {
        "at": NOW,
        "event": "promoted",
        "version": 2,
        "detail": "agreement 99.4 % over 812 mirrored",
    }


def test_a_canary_is_rolled_back_with_the_reason() -> None:
    index = with_canary(_index_with(2), 2, 0.1, 0.5, NOW)
    back = rolled_back(index, NOW, "agreement 9.8 % over 500 mirrored, below 97 %")
    assert back.serving == 1 and back.canary is None and back.live() == [1]
    assert back.versions[2].state == VersionState.FAILED and "9.8 %" in back.versions[2].detail
    assert back.versions[1].state == VersionState.SERVING
    assert back.next_version() == 3
    with pytest.raises(ValueError, match="version 2 is failed; only a staged version can become the canary"):
        with_canary(back, 2, 0.1, 0.1, NOW)


def test_rollbacks_without_a_canary_walk_back_the_versions_that_served() -> None:
    index = _index_with(2, 3)
    index = promoted(with_canary(index, 2, 0.1, 0.1, NOW), NOW, "ok")
    index = promoted(with_canary(index, 3, 0.1, 0.1, NOW), NOW, "ok")
    index = rolled_back(index, NOW, "by hand")
    assert index.serving == 2 and index.versions[3].state == VersionState.RETIRED
    index = rolled_back(index, NOW, "by hand")
    assert index.serving == 1 and index.versions[2].state == VersionState.RETIRED
    with pytest.raises(ValueError, match="no canary, and no version served before version 1"):
        rolled_back(index, NOW, "by hand")


def test_transitions_that_are_not_allowed_say_why() -> None:
    index = _index_with(2, 3)
    with pytest.raises(ValueError, match="no canary to promote"):
        promoted(index, NOW, "")
    with pytest.raises(ValueError, match="version 1 is serving; only a staged version"):
        with_canary(index, 1, 0.1, 0.1, NOW)
    with pytest.raises(ValueError, match="version 9 does not exist"):
        with_canary(index, 9, 0.1, 0.1, NOW)
    with pytest.raises(ValueError, match="share 1.5 is outside 0..1"):
        with_canary(index, 2, 1.5, 0.1, NOW)
    canary = with_canary(index, 2, 0.1, 0.1, NOW)
    with pytest.raises(ValueError, match="version 2 is the canary already"):
        with_canary(canary, 3, 0.1, 0.1, NOW)
    with pytest.raises(ValueError, match="version 2 exists already.*the next is 4"):
        with_added(index, VersionRecord(2, VersionState.STAGED, "manifests/2.json", NOW))
    with pytest.raises(ValueError, match="added as staged"):
        with_added(index, VersionRecord(4, VersionState.SERVING, "manifests/4.json", NOW))
    assert dataclasses.replace(index) == index  # transitions returned new indexes; this one is unchanged
    assert [r.state for r in index.versions.values()] == [
        VersionState.SERVING,
        VersionState.STAGED,
        VersionState.STAGED,
    ]


def test_a_copy_of_a_repository_keeps_working(serving, tmp_path) -> None:
    """Versions are plain folders and files: a copied repository (shutil.copytree) reads the same."""
    add_version(_staged(tmp_path / "a", "a"), serving)
    copy = tmp_path / "copy"
    shutil.copytree(serving, copy)
    assert read_index(copy) == read_index(serving)
    assert load_version_manifest(copy, 2) == load_version_manifest(serving, 2)


def test_a_variant_the_serving_repository_lacks_gets_its_triton_config(serving, tmp_path) -> None:
    staged = _staged(tmp_path / "a", "a")
    m = load_manifest(staged)
    name = f"{MODEL}_int8_extra"
    (staged / name / "1").mkdir(parents=True)
    shutil.copyfile(staged / m.variants["int8"].path, staged / name / "1" / "model.onnx")
    (staged / name / "config.pbtxt").write_text(
        (staged / f"{MODEL}_int8" / "config.pbtxt").read_text().replace(f"{MODEL}_int8", name)
    )
    m.variants["int8_extra"] = dataclasses.replace(
        m.variants["int8"], key="int8_extra", triton_name=name, path=f"{name}/1/model.onnx", opt_in=True
    )
    save_manifest(staged, m)
    n, added = add_version(staged, serving)
    assert added.variants["int8_extra"].path == f"{name}/2/model.onnx"
    config = text_format.Parse((serving / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == name and list(config.version_policy.specific.versions) == [2]


def test_a_version_with_the_serving_version_s_bytes_shares_its_files(serving, tmp_path) -> None:
    """Versions are immutable, so the same bytes are one file on disk (hard links), never a copy to keep in step."""
    staged = _staged(tmp_path / "a", "a")
    add_serving_version(staged, serving)
    before = _tree(serving)
    n, m = add_version(staged, serving)  # the same export again
    assert n == 3
    for v in m.variants.values():
        serving_file = serving / v.path.replace("/3/", "/2/")
        assert (serving / v.path).stat().st_ino == serving_file.stat().st_ino
        assert sha256_file(serving / v.path) == v.sha256
    after = _tree(serving)
    kept = [k for k in before if not k.endswith(".pbtxt") and k != INDEX_NAME]  # versions' files, manifest.json
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert (staged / m.variants["int8"].path.replace("/3/", "/1/")).stat().st_nlink == 1  # never linked to staged


def test_the_index_lock_is_re_entrant_in_a_thread_and_excludes_other_threads(serving, tmp_path) -> None:
    import threading

    from adaptive_quant.core.versions import index_lock

    order: list[str] = []
    with index_lock(serving):
        n, _ = add_version(_staged(tmp_path / "a", "a"), serving)  # takes the lock again: no deadlock

        def take() -> None:
            with index_lock(serving):
                order.append("other")

        other = threading.Thread(target=take)
        other.start()
        other.join(timeout=0.3)
        order.append("holder")
    other.join(timeout=5)
    assert n == 2 and order == ["holder", "other"]
