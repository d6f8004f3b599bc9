"""Load tester, benchmark, clients and the local Triton runner: they reach the gateway over HTTP only.

May import: `core` and the package root; never `serving`'s internals, `training` or torch.
"""
