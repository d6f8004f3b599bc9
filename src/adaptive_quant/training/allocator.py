"""glibc's allocator settings for training: keep freed memory for reuse instead of handing it back.

A bf16 training step at batch 1024 allocates activations of up to ~270 MB each. glibc serves every
allocation above its largest mmap threshold (32 MB on 64-bit) with a fresh mmap and unmaps it on
free, so every step faults in gigabytes of new zeroed pages and a fifth of the CPU goes to the
kernel. With mmap for chunks off and heap trimming off, freed memory stays in the heap and the
next step reuses it: about 1.4× the images/s per train step (jemalloc without decay does as well,
but it is not installed everywhere; docs/platform.md). The price is that the process
keeps its peak footprint (~2.5 GB for the recipe), which training reaches anyway.

GLIBC_TUNABLES is read once, by the dynamic loader, so the training CLI starts itself again with
it set (`reexec_tuned`). A GLIBC_TUNABLES that already names a glibc.malloc setting is left as it
is: that is how a user chooses another setting, or glibc's own defaults.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# mmap_max=0: no chunk is ever mmapped, so no allocation is unmapped on free; trim_threshold 1 TiB:
# the heap top is never given back. (Thread heaps are still mmapped arenas, which glibc keeps.)
TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
MARKER = "glibc.malloc."


def applies(environ: Mapping[str, str], system: str | None = None, libc: str | None = None) -> bool:
    """Whether to start again with TUNABLES: on Linux with glibc, unless the user set malloc tunables."""
    system = platform.system() if system is None else system
    libc = platform.libc_ver()[0] if libc is None else libc
    return system == "Linux" and libc == "glibc" and MARKER not in environ.get("GLIBC_TUNABLES", "")


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with TUNABLES appended to any GLIBC_TUNABLES already there."""
    env = dict(environ)
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    return env


def active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs with TUNABLES (for the log and the MLflow run)."""
    return TUNABLES in (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")


def reexec_tuned() -> None:
    """Replace this process by the same command line with TUNABLES set; returns when not applicable."""
    if applies(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), tuned_environ(os.environ))
