"""The Python-backend flavour of a model repository, for the Triton binary that nvidia-pytriton ships.

That binary has only the `python` backend (no onnxruntime backend; see docs/platform.md),
so each served variant becomes a Python-backend model whose `model.py` runs the *same* ONNX
file with ONNX Runtime on CPU. Layout written under `dst_repo`:

    manifest.json                         copied (unserved baselines dropped: nothing serves them)
    <triton_name>/config.pbtxt            triton_config.render_config(flavor="python")
    <triton_name>/1/model.py              MODEL_PY below
    <triton_name>/1/model.onnx            hard link to the source file (a copy across file systems)
    router/1/deferral.{npz,json}          the two-stage router, linked likewise (the gateway reads it)

No torch; pure file work, so the export stage and the tests can both call it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from adaptive_quant.core.manifest import MANIFEST_NAME, load_manifest, save_manifest
from adaptive_quant.export.triton_config import TritonModelSpec, render_config

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"

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


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # same bytes, no extra disk; sha256 in the manifest stays true
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


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


def write_python_flavor(src_repo: str | Path, dst_repo: str | Path, intra_op_threads: int = 1) -> Path:
    """Write the Python-backend flavour of `src_repo` (a repository made by the export) into `dst_repo`.

    `dst_repo` must not be `src_repo`; existing variant folders in it are replaced. Returns `dst_repo`.
    """
    src, dst = Path(src_repo).resolve(), Path(dst_repo).resolve()
    if src == dst:
        raise ValueError(f"the python flavour needs its own folder, not the source repository {src}")
    manifest = load_manifest(src, verify_files=False)
    dst.mkdir(parents=True, exist_ok=True)
    dropped = [k for k, v in manifest.variants.items() if not v.served]
    for key in dropped:  # baselines exist for reports; no Triton model serves them
        del manifest.variants[key]
    for v in manifest.variants.values():
        onnx_src = src / v.path
        if not onnx_src.is_file():
            raise FileNotFoundError(f"variant {v.key}: {onnx_src} is missing")
        model_dir = dst / v.triton_name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        _link_or_copy(onnx_src, model_dir / "1" / ONNX_FILE)
        (model_dir / "1" / "model.py").write_text(MODEL_PY)
        src_cfg_path = src / v.triton_name / "config.pbtxt"
        src_cfg = src_cfg_path.read_text() if src_cfg_path.is_file() else ""
        (model_dir / "config.pbtxt").write_text(
            python_config(
                v.triton_name,
                src_cfg,
                manifest.input_name,
                manifest.output_name,
                manifest.image_size,
                len(manifest.classes),
                intra_op_threads,
            )
        )
        v.path = f"{v.triton_name}/1/{ONNX_FILE}"  # where it now lies (the same bytes, so the same sha256)
    if manifest.router:
        # the two-stage router runs in the gateway, not in Triton, but the gateway reads it from the
        # repository it is given: a flavour without it would name missing files and serve single-stage
        for key in ("path", "spec_path"):
            if manifest.router.get(key):
                _link_or_copy(src / manifest.router[key], dst / manifest.router[key])
    manifest.training = {**manifest.training, "triton_flavor": "python", "flavor_of": str(src)}
    save_manifest(dst, manifest)
    log.info(
        "python flavour of %s written to %s: %s%s",
        src,
        dst,
        ", ".join(v.triton_name for v in manifest.variants.values()),
        f" (dropped unserved {', '.join(dropped)})" if dropped else "",
    )
    return dst


def served_model_names(repo: str | Path) -> list[str]:
    """Triton model names of the served variants of a repository (what explicit mode should load)."""
    data = json.loads((Path(repo) / MANIFEST_NAME).read_text())
    return [v["triton_name"] for v in data["variants"].values() if v.get("served", True)]
