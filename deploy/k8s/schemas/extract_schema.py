"""Regenerate rayservice-v1.schema.json.gz from KubeRay's RayService CRD (see SOURCE.md).

    git --git-dir=<kuberay>/.git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayservices.yaml > crd.yaml
    python deploy/k8s/schemas/extract_schema.py crd.yaml

Writes the CRD's `spec.versions[name=v1].schema.openAPIV3Schema`, whole and unchanged, as compact
JSON with sorted keys, gzip-compressed with mtime 0 so that the same CRD gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "rayservice-v1.schema.json.gz"


def extract_v1_schema(crd: dict) -> dict:
    """The served v1 version's openAPIV3Schema of a RayService CustomResourceDefinition."""
    if crd.get("kind") != "CustomResourceDefinition" or crd["spec"]["names"]["kind"] != "RayService":
        raise ValueError("expected the RayService CustomResourceDefinition (ray.io_rayservices.yaml)")
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1":
            return version["schema"]["openAPIV3Schema"]
    raise ValueError("the CRD has no v1 version: use a KubeRay release >= 1.0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="ray.io_rayservices.yaml from a KubeRay release")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    raw = args.crd.read_bytes()
    schema = extract_v1_schema(yaml.safe_load(raw))
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
    args.output.write_bytes(gzip.compress(text, mtime=0))
    print(f"CRD sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"schema JSON sha256 {hashlib.sha256(text).hexdigest()} ({len(text)} bytes) -> {args.output}")


if __name__ == "__main__":
    main()
