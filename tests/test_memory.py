"""The daemon caps glibc's malloc arenas (``ingestor.memory``), unless the operator did."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="mallopt(M_ARENA_MAX) is glibc's")
def test_arenas_capped_on_glibc_unless_the_environment_says():
    code = "from ingestor.memory import limit_arenas; print(limit_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "True"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, MALLOC_ARENA_MAX="4"),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
