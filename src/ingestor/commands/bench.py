"""``ingestor bench``: the benchmark suite (the scripts in the checkout's ``bench/``).

Each stage module ``bench/bench_<stage>.py`` exposes ``run(quick: bool) ->
list[dict]`` (rows of its table) and ``TITLE``.  Stages run one after the
other in this process and print their tables as they finish.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

#: Stages in pipeline order.
STAGES = ("decode", "aggregate", "copy", "schema", "replay", "startup", "live", "recovery", "orders")


def bench_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "bench"))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite",
                       description="Run the benchmarks stage by stage and print a table "
                       "per stage (medians of several runs, alternatives side by side).")
    p.add_argument("--only", action="append", choices=STAGES, metavar="STAGE",
                   help=f"run only this stage (repeatable): {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="short smoke run (figures meaningless)")
    p.add_argument("--dsn", help="database for the stages that need one")
    p.set_defaults(func=run)


def run(args) -> int:
    from ingestor import DEBUG
    from ingestor.cli import Failure

    bdir = bench_dir()
    if not os.path.isdir(bdir):
        raise Failure("the benchmarks live in the source checkout's bench/ folder: run from a checkout")
    if bdir not in sys.path:
        sys.path.insert(0, bdir)
    if args.dsn:
        os.environ["INGESTOR_BENCH_DSN"] = args.dsn
    common = importlib.import_module("common")
    print(f"ingestor bench on {common.machine()}{' (DEBUG BUILD: figures not representative)' if DEBUG else ''}")
    for stage in args.only or STAGES:
        try:
            mod = importlib.import_module(f"bench_{stage}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench_{stage}":
                continue
            raise
        t0 = time.perf_counter()
        rows = mod.run(quick=args.quick)
        print()
        print(common.table(rows, f"{mod.TITLE}  [{time.perf_counter() - t0:.0f} s]"))
        sys.stdout.flush()
    return 0
