"""Load tester, benchmark helpers, clients and the local Triton runner: they reach the gateway over HTTP only.

May import: `core` and the package root; never `serving` (nor fastapi/starlette: an in-process
gateway is wired in `cli/`), `training`, `export` or torch. pyproject.toml's import contracts check it.
"""
