"""Helpers shared by the benchmark scripts: timing, medians, tables, RSS."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs (after ``warmup``), GC off."""
    for _ in range(warmup):
        fn()
    times = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return statistics.median(times)


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc where available, else the peak."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt(v) -> str:
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[dict], title: str | None = None) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    for r in rows[1:]:
        for c in r:
            if c not in cols:
                cols.append(c)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = []
    if title:
        out.append(title)
    out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
    out.append("  ".join("-" * w for w in widths))
    for row in cells:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def server_dsn() -> str:
    """The database server the benchmarks use (``INGESTOR_BENCH_DSN``)."""
    return os.environ.get("INGESTOR_BENCH_DSN",
                          "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


class scratch_database:
    """``with scratch_database() as dsn:`` a database created for a benchmark, dropped after."""

    def __init__(self, server: str | None = None):
        self.server = server or server_dsn()

    def __enter__(self) -> str:
        import secrets

        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        self.name = f"ingestor_bench_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(self.server, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        params = conninfo_to_dict(self.server)
        params["dbname"] = self.name
        return make_conninfo(**params)

    def __exit__(self, *exc) -> None:
        import psycopg

        with psycopg.connect(self.server, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
