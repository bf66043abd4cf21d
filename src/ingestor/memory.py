"""The daemon's native memory: glibc's malloc arenas capped before its threads start.

glibc gives a thread that allocates while another holds an arena a new arena of its own, up
to 8 per core, and memory freed in one arena is not reused by another.  The daemon's
threads (event loop, pipeline, spool, writer's executor) each allocate and free large
buffers at their own pace, so its resident size crept: 90 -> 122 MiB over a 10-minute soak at
100,000 ticks/s (still 1.4 MiB a minute in its second half), while the Python heap
(``tracemalloc``) stayed at 74-83 MiB.  With two arenas (``MALLOC_ARENA_MAX=2``, the same
setting) the same soak went 86 -> 93 MiB, 0.25 MiB a minute in its second half, and nothing
got slower (``python -m ingestor.benchmarks.live --rates 100000 --seconds 600``).
"""

from __future__ import annotations

import os
import sys

#: glibc's ``M_ARENA_MAX`` (``malloc.h``)
_M_ARENA_MAX = -8
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)`` on glibc, unless ``MALLOC_ARENA_MAX`` is set (the
    operator's choice wins).  Call it before the threads start.  True when it took effect."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt  # glibc's; absent from other C libraries
    except (OSError, AttributeError):
        return False
    return mallopt(_M_ARENA_MAX, arenas) == 1
