"""Offline and over-HTTP evaluation of fixed variants against adaptive routing, and the Pareto report.

One strategy model for single-stage and two-stage routing (strategies.py: single-stage is two-stage
with no follow-up), priced on recorded outcomes; one verdict (report.py); one renderer (render.py).
May import: `core`, `predictor`, `export` (ONNX Runtime evaluation), the package root; never
`serving`, `tools`, `training` or `cli` (import contracts in pyproject.toml).
"""
