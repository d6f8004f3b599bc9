"""What one gateway process knows of its place among the others (server.workers > 1).

Its own module so that the supervisor (workers.py) and the service it starts (factory.py) both
import it, neither importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerRole:
    """One worker's index among `count`; worker 0 profiles the host and runs the memory policy."""

    index: int  # 0 .. count-1
    count: int
    profile_path: Path  # worker 0 writes the start-up profile here, the others read it
