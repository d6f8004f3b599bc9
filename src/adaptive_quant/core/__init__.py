"""Contracts every stage shares: the manifest, precisions, routing policy and its single-stage prior,
latency model, stats.

May import: the standard library, NumPy, pydantic, PyYAML. Never another stage, torch or a web framework.
"""
