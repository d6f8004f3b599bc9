"""Offline and over-HTTP evaluation of fixed variants against adaptive routing, and the Pareto report.

May import: `core`, `predictor`, `export` (ONNX Runtime evaluation), the package root; never `serving`.
"""
