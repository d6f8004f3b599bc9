"""Staged copies of a model repository, for rehearsing a roll-out (scripts/bench_rollout.py, tests).

A staged repository is what `aq-export` writes into a fresh folder: one version (`<name>/1/model.onnx`),
its router and its manifest. Two copies of a serving repository's current version are useful:
- **re-saved**: the same networks written again (a new doc string, so new bytes and a new sha256).
  A roll-out must promote it: it answers exactly as the serving version does.
- **permuted**: every network's logits go through a fixed derangement of the classes (a Gather on
  the output), so it runs fine, at the same speed, and names another class for every image. Its
  manifest keeps the serving version's figures (as a stale or wrong manifest would): only the
  canary's mirrored agreement can tell, and a roll-out must roll it back.

Pure file work with `onnx`; no torch, no ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from adaptive_quant.core.manifest import Manifest, load_manifest, save_manifest, sha256_file
from adaptive_quant.core.versions import utc_now

ONNX_FILE = "model.onnx"


def derangement(num_classes: int, seed: int) -> np.ndarray:
    """(C,) int64: a seeded permutation with no fixed point (class c never maps to itself)."""
    rng = np.random.default_rng(seed)
    shift = int(rng.integers(1, num_classes))  # a rotation by 1..C-1 moves every class
    order = rng.permutation(num_classes)
    perm = np.empty(num_classes, dtype=np.int64)
    perm[order] = order[(np.arange(num_classes) + shift) % num_classes]
    return perm


def permute_outputs(model: onnx.ModelProto, output_name: str, perm: np.ndarray) -> onnx.ModelProto:
    """The same network with its output's columns reordered: out[:, j] = original[:, perm[j]]."""
    raw = f"{output_name}_before_permutation"
    for node in model.graph.node:
        node.output[:] = [raw if o == output_name else o for o in node.output]
    indices = numpy_helper.from_array(perm.astype(np.int64), name=f"{output_name}_permutation")
    model.graph.initializer.append(indices)
    model.graph.node.append(helper.make_node("Gather", [raw, indices.name], [output_name], axis=1))
    return model


def make_staged_copy(src: str | Path, dst: str | Path, *, permute_seed: int | None = None) -> Manifest:
    """Write a staged repository at `dst` (must not exist) from `src`'s serving version (its
    manifest.json): re-saved networks, or with `permute_seed` permuted ones. Returns its manifest."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists: a staged repository goes into a fresh folder")
    manifest = load_manifest(src)
    perm = None if permute_seed is None else derangement(len(manifest.classes), permute_seed)
    what = "re-saved" if perm is None else f"classes permuted by {perm.tolist()}"
    variants = {}
    for v in manifest.served_variants():
        model = onnx.load(str(src / v.path))
        if perm is not None:
            model = permute_outputs(model, manifest.output_name, perm)
        model.doc_string = f"staged copy of {src.name}/{v.path} ({what}) at {utc_now()}"
        folder = dst / v.triton_name / "1"
        folder.mkdir(parents=True)
        path = folder / ONNX_FILE
        onnx.save(model, str(path))
        config = src / v.triton_name / "config.pbtxt"
        if config.is_file():
            shutil.copyfile(config, dst / v.triton_name / "config.pbtxt")
        variants[v.key] = dataclasses.replace(
            v, path=str(path.relative_to(dst)), sha256=sha256_file(path), size_bytes=path.stat().st_size
        )
    updates = {"variants": variants, "created_at": utc_now()}
    # the routers: the main one in router/1/, the cheap entry's (speed_router) in router/1/speed/
    for attr, folder in (("router", dst / "router" / "1"), ("speed_router", dst / "router" / "1" / "speed")):
        router = dict(getattr(manifest, attr)) if getattr(manifest, attr, None) else None
        for field in ("path", "spec_path"):
            if router is not None and router.get(field):
                target = folder / Path(router[field]).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / router[field], target)
                router[field] = str(target.relative_to(dst))
        if hasattr(manifest, attr):
            updates[attr] = router
    if any(f.name == "version" for f in dataclasses.fields(manifest)):
        updates["version"] = 1  # a staged repository is one fresh version; the roll-out numbers it
    staged = dataclasses.replace(manifest, **updates)
    save_manifest(dst, staged)
    return staged
