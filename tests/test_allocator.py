"""The training CLI's allocator settings: applied by starting the process again, never forced on a user."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adaptive_quant.training import allocator

PRINT_AFTER_REEXEC = (
    "import os; from adaptive_quant.training import allocator; allocator.reexec_tuned(); "
    "print(os.environ.get('GLIBC_TUNABLES', ''))"
)


def test_applies_on_linux_glibc_unless_the_user_chose_malloc_tunables() -> None:
    assert allocator.applies({}, "Linux", "glibc")
    assert allocator.applies({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, "Linux", "glibc")
    assert not allocator.applies({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", "glibc")
    assert not allocator.applies({}, "Linux", "")  # musl
    assert not allocator.applies({}, "Darwin", "")


def test_tuned_environ_keeps_what_was_there() -> None:
    env = allocator.tuned_environ({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.rtld.nns=2:{allocator.TUNABLES}"}
    assert allocator.tuned_environ({})["GLIBC_TUNABLES"] == allocator.TUNABLES
    assert allocator.active(env) and not allocator.active({})


def _run(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PRINT_AFTER_REEXEC], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not allocator.applies({}), reason="the re-exec applies to Linux with glibc only")
def test_a_real_process_starts_again_with_the_tunables_and_leaves_a_user_s_own() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert allocator.MARKER + "mmap_max=0" in _run(env)
    # a user's own malloc choice is kept as it is, and nothing is added
    assert _run({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "glibc.malloc.arena_max=2"
