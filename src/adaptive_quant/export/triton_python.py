"""The Python-backend flavour of a model repository, for the Triton binary that nvidia-pytriton ships.

That binary has only the `python` backend (no onnxruntime backend; see docs/platform.md),
so each served variant becomes a Python-backend model whose `model.py` runs the *same* ONNX
file with ONNX Runtime on CPU. Layout written under `dst_repo`:

    manifest.json                         copied (unserved baselines dropped: nothing serves them)
    <triton_name>/config.pbtxt            triton_config.render_config(flavor="python")
    <triton_name>/<N>/model.py            MODEL_PY below (it runs the model.onnx beside it)
    <triton_name>/<N>/model.onnx          hard link to the source file (a copy across file systems)
    router/<N>/deferral.{npz,json}        the two-stage router (and router/<N>/speed/, the cheap entry's), linked likewise

N is the repository's one version (1) when it has no versions.json. A versioned repository
(core/versions.py) gets a folder per live version (serving, canary, and any its version_policy
lists), each config.pbtxt keeps its `version_policy`, and versions.json + manifests/ come along.

No torch; pure file work, so the export stage and the tests can both call it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import py_compile
import re
import shutil
from pathlib import Path

from adaptive_quant.core.manifest import Manifest, load_manifest, save_manifest, sha256_file
from adaptive_quant.core.versions import INDEX_NAME, load_version_manifest, read_index
from adaptive_quant.export.triton_config import TritonModelSpec, policy_versions, render_config, with_version_policy

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
MANIFESTS_DIR = "manifests"  # <repo>/manifests/<N>.json: version N's manifest (core/versions.py)

# The model.py of every variant. It reads the input/output names from the model config Triton
# hands it, so one file serves any variant. Triton's dynamic batcher gives `execute` a list of
# requests (each with its own batch of N_i samples): they are concatenated into one ONNX Runtime
# call and the logits split back, which is what batching is for.
MODEL_PY = '''"""Triton Python-backend model: runs this version folder's model.onnx with ONNX Runtime (CPU).

Written by adaptive_quant.export.triton_python; do not edit (re-run the export instead).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        # threads per ORT call; Triton runs one stub process per instance, so keep it small
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't burn idle cores
        opts.log_severity_level = 3  # errors only
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)  # (sum N_i, 3, H, W)
        try:
            y = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        except Exception as exc:  # one failed call fails every request of the batch, with the reason
            error = pb_utils.TritonError(f"ONNX Runtime failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(y[start : start + n], np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += n
        return responses

    def finalize(self):
        self.session = None
'''


def _config_int(text: str, key: str, default: int) -> int:
    """An integer field of a production config.pbtxt (first occurrence), or `default`."""
    m = re.search(rf"\b{key}\s*:\s*(\d+)", text)
    return int(m.group(1)) if m else default


def _preferred(text: str, max_batch: int) -> tuple[int, ...]:
    m = re.search(r"preferred_batch_size\s*:\s*\[([^\]]*)\]", text)
    if not m:
        return tuple(b for b in (8, 32, 64) if b <= max_batch)
    return tuple(int(b) for b in m.group(1).replace(",", " ").split())


def link_or_copy(src: Path, dst: Path, sha256: str | None = None) -> None:
    """`dst` holds `src`'s bytes: a hard link (no extra disk; the manifest's sha256 stays true), or a
    copy across file systems. A `dst` that holds them already is left alone (and its mtime, which
    Triton reads)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        if os.path.samefile(src, dst) or (sha256 is not None and sha256_file(dst) == sha256):
            return  # already these bytes: leave the file (and its mtime, which Triton reads) alone
        dst.unlink()
    try:
        os.link(src, dst)  # same bytes, no extra disk; sha256 in the manifest stays true
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _write_if_changed(path: Path, text: str) -> bool:
    """Write `text` unless the file holds it already (returns whether it wrote): a rewritten file in
    a version folder looks like a changed model to Triton, which reloads that version on the next
    load_model of the model."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def write_model_py(version_dir: str | Path) -> Path:
    """<version_dir>/model.py (MODEL_PY) and its bytecode in __pycache__; returns the model.py path.

    The Python-backend stub imports model.py in an interpreter that ignores PYTHONDONTWRITEBYTECODE:
    without a valid .pyc it writes __pycache__ into the version folder while Triton loads it, and
    Triton, finding the folder newer than what it loaded, reloads that version at the next
    load_model of the model (another version added, one retired). Compiled here, nothing is written.
    """
    path = Path(version_dir) / "model.py"
    wrote = _write_if_changed(path, MODEL_PY)
    cfile = importlib.util.cache_from_source(str(path))  # the stub is this interpreter's Python version
    if wrote or not Path(cfile).is_file():
        py_compile.compile(str(path), cfile=cfile, doraise=True)
    return path


def python_config(
    name: str,
    src_config: str,
    input_name: str,
    output_name: str,
    image_size: int,
    num_classes: int,
    intra_op_threads: int = 1,
) -> str:
    """config.pbtxt of the python flavour, keeping the production config's batching numbers."""
    max_batch = _config_int(src_config, "max_batch_size", 64)
    spec = TritonModelSpec(
        name=name,
        input_name=input_name,
        output_name=output_name,
        image_size=image_size,
        num_classes=num_classes,
        max_batch_size=max_batch,
        preferred_batch_sizes=_preferred(src_config, max_batch),
        max_queue_delay_us=_config_int(src_config, "max_queue_delay_microseconds", 500),
        instance_count=_config_int(src_config, "count", 1),
        flavor="python",
    )
    params = f'parameters: {{ key: "intra_op_threads" value: {{ string_value: "{intra_op_threads}" }} }}\n'
    return render_config(spec) + params


def _flavoured(manifest: Manifest, src: Path) -> list[str]:
    """Drop the unserved variants (baselines exist for reports; no Triton model serves them) and
    note the flavour; returns the dropped keys."""
    dropped = [k for k, v in manifest.variants.items() if not v.served]
    for key in dropped:
        del manifest.variants[key]
    manifest.training = {**manifest.training, "triton_flavor": "python", "flavor_of": str(src)}
    return dropped


def _write_version(src: Path, dst: Path, manifest: Manifest, version: int, keep_existing: bool) -> None:
    """<triton_name>/<version>/{model.onnx, model.py} of every variant, and the router's files;
    the variants' paths are rewritten to where the files now lie (the same bytes, so the same sha256).
    keep_existing: a version folder already holding these bytes is left as it is (Triton may serve it)."""
    for v in manifest.variants.values():
        onnx_src = src / v.path
        if not onnx_src.is_file():
            raise FileNotFoundError(f"variant {v.key} (version {version}): {onnx_src} is missing")
        folder = dst / v.triton_name / str(version)
        link_or_copy(onnx_src, folder / ONNX_FILE, v.sha256 if keep_existing else None)
        write_model_py(folder)
        v.path = f"{v.triton_name}/{version}/{ONNX_FILE}"
    # the two-stage routers (the main one, and the cheap entry's) run in the gateway, not in Triton, but
    # the gateway reads them from the repository it is given: a flavour without them would name
    # missing files and serve single-stage (or without the cheap entry)
    for router in (manifest.router, manifest.speed_router):
        for key in ("path", "spec_path"):
            if router and router.get(key):
                link_or_copy(src / router[key], dst / router[key])


def _write_config(src: Path, dst: Path, manifest: Manifest, name: str, threads: int, policy: list[int] | None) -> None:
    src_cfg_path = src / name / "config.pbtxt"
    src_cfg = src_cfg_path.read_text() if src_cfg_path.is_file() else ""
    text = python_config(
        name,
        src_cfg,
        manifest.input_name,
        manifest.output_name,
        manifest.image_size,
        len(manifest.classes),
        threads,
    )
    _write_if_changed(dst / name / "config.pbtxt", with_version_policy(text, policy) if policy else text)


def write_python_flavor(src_repo: str | Path, dst_repo: str | Path, intra_op_threads: int = 1) -> Path:
    """Write the Python-backend flavour of `src_repo` (a repository made by the export) into `dst_repo`.

    `dst_repo` must not be `src_repo`. A repository without versions.json: its variant folders in
    `dst_repo` are replaced. A versioned one: see `_write_versioned`. Returns `dst_repo`.
    """
    src, dst = Path(src_repo).resolve(), Path(dst_repo).resolve()
    if src == dst:
        raise ValueError(f"the python flavour needs its own folder, not the source repository {src}")
    if (src / INDEX_NAME).is_file():
        return _write_versioned(src, dst, intra_op_threads)
    manifest = load_manifest(src, verify_files=False)
    dst.mkdir(parents=True, exist_ok=True)
    dropped = _flavoured(manifest, src)
    for v in manifest.variants.values():
        if (dst / v.triton_name).exists():
            shutil.rmtree(dst / v.triton_name)
    _write_version(src, dst, manifest, manifest.version, keep_existing=False)
    for v in manifest.variants.values():
        _write_config(src, dst, manifest, v.triton_name, intra_op_threads, None)
    save_manifest(dst, manifest)
    log.info(
        "python flavour of %s written to %s: %s%s",
        src,
        dst,
        ", ".join(v.triton_name for v in manifest.variants.values()),
        f" (dropped unserved {', '.join(dropped)})" if dropped else "",
    )
    return dst


def _write_versioned(src: Path, dst: Path, intra_op_threads: int) -> Path:
    """The flavour of a versioned repository: every live version (versions.json's serving and canary)
    and every version a config.pbtxt's version_policy lists, each in its own folder; each model's
    config keeps the source's version_policy (or lists the versions written that have it);
    manifests/ and versions.json are copied, manifest.json is the serving version's.

    Version folders already holding the same bytes are left untouched, and none is removed: rewriting
    the flavour beside a running Triton does not disturb the versions it serves.
    """
    index = read_index(src)
    wanted = set(index.live())
    names = {v.triton_name for n in wanted for v in load_version_manifest(src, n).served_variants()}
    for name in names:  # a version the policy still keeps loaded (between a promotion's steps)
        cfg = src / name / "config.pbtxt"
        listed = policy_versions(cfg.read_text()) if cfg.is_file() else None
        wanted |= {n for n in listed or [] if n in index.versions}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFESTS_DIR).mkdir(exist_ok=True)
    has_model: dict[str, set[int]] = {}
    written: dict[int, Manifest] = {}
    for n in sorted(wanted):
        manifest = load_version_manifest(src, n)
        _flavoured(manifest, src)
        _write_version(src, dst, manifest, n, keep_existing=True)
        _write_if_changed(dst / MANIFESTS_DIR / f"{n}.json", manifest.to_json() + "\n")
        for v in manifest.variants.values():
            has_model.setdefault(v.triton_name, set()).add(n)
        written[n] = manifest
    for name, versions in sorted(has_model.items()):
        cfg = src / name / "config.pbtxt"
        policy = (policy_versions(cfg.read_text()) if cfg.is_file() else None) or sorted(versions)
        latest = written[max(versions)]
        _write_config(src, dst, latest, name, intra_op_threads, policy)
    for other in sorted((src / MANIFESTS_DIR).glob("*.json")):  # versions not written: their record
        if not other.stem.isdigit() or int(other.stem) not in written:
            _write_if_changed(dst / MANIFESTS_DIR / other.name, other.read_text())
    save_manifest(dst, written[index.serving])
    _write_if_changed(dst / INDEX_NAME, (src / INDEX_NAME).read_text())  # last: the index names what is there
    log.info(
        "python flavour of %s written to %s: versions %s (serving %s), models %s",
        src,
        dst,
        ", ".join(str(n) for n in sorted(written)),
        index.serving,
        ", ".join(f"{name} {sorted(v)}" for name, v in sorted(has_model.items())),
    )
    return dst


def live_versions(repo: str | Path) -> list[int]:
    """The versions that take traffic (versions.json's serving and canary; the one version of a
    repository without versions.json)."""
    return read_index(repo).live()


def served_model_names(repo: str | Path) -> list[str]:
    """Triton model names of the served variants of the live versions (what explicit mode should load)."""
    names: list[str] = []
    for n in live_versions(repo):
        for v in load_version_manifest(repo, n).served_variants():
            if v.triton_name not in names:
                names.append(v.triton_name)
    return names
