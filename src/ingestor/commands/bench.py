"""``ingestor bench``: the benchmark suite (the modules of :mod:`ingestor.benchmarks`, part of
the package: it runs from an installed package as from a checkout).

Each stage module ``ingestor/benchmarks/<stage>.py`` exposes ``run(quick: bool) ->
list[dict]`` (rows of its table) and ``TITLE``.  Stages run one after the
other in this process and print their tables as they finish.  The benchmarks that compare
with another checkout (``--baseline DIR``) or need a server of their own run as
``python -m ingestor.benchmarks.<name>`` (docs/benchmarks.md).

``--json FILE`` writes the results (the machine and core build, then each stage's rows);
``--compare OLD.json`` prints each figure of this run beside the same figure of an
earlier one, with the ratio new / old; ``--png FILE`` draws each stage's rates, the
alternatives side by side (matplotlib, the ``[bench]`` extra).  ``--results FILE.json``
takes an earlier run's results instead of running (to compare or chart two saved runs).

A row is known across runs by its text values (mode, case, implementation...): its numbers
are the figures.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
import time

#: the format of ``--json`` files (a later change of layout raises it)
RESULTS_FORMAT = 1

#: Stages in pipeline order.
STAGES = ("decode", "aggregate", "copy", "schema", "replay", "startup", "live", "recovery", "orders")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite",
                       description="Run the benchmarks stage by stage and print a table "
                       "per stage (medians of several runs, alternatives side by side).")
    p.add_argument("--only", action="append", choices=STAGES, metavar="STAGE",
                   help=f"run only this stage (repeatable): {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="short smoke run (figures meaningless)")
    p.add_argument("--dsn", help="database for the stages that need one")
    p.add_argument("--json", metavar="FILE", dest="json_out",
                   help="write the results as JSON: the machine, the core build, each "
                   "stage's rows (default: none)")
    p.add_argument("--compare", metavar="OLD.json",
                   help="print each figure beside the same one of an earlier --json file, "
                   "with the ratio new / old (default: no comparison)")
    p.add_argument("--png", metavar="FILE",
                   help="draw each stage's rates, alternatives side by side, as a PNG chart "
                   "(needs matplotlib: pip install 'ingestor[bench]'; default: none)")
    p.add_argument("--results", metavar="FILE.json",
                   help="use an earlier --json file instead of running the benchmarks (with "
                   "--compare or --png; default: run them)")
    p.set_defaults(func=run)


def machine_info() -> dict:
    """What the figures depend on: the CPU, the cores this process may use, Python, the
    package version and the core's build (a debug build is several times slower)."""
    from ingestor import __version__
    from ingestor.build import core_build

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu": model, "arch": platform.machine(), "cores": os.cpu_count(),
            "usable_cores": usable, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "ingestor": __version__, "core": core_build()}


def _clean(v):
    """JSON values: NaN and infinities as null, numpy scalars as numbers."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def load_results(path: str) -> dict:
    """An earlier ``--json`` file, checked enough to compare or chart it (UsageError if not)."""
    from ingestor.cli import UsageError

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not a bench results file ({type(exc).__name__})") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if (data.get("format") != RESULTS_FORMAT if isinstance(data, dict) else True) or \
            not isinstance(stages, dict) or not all(
                isinstance(st, dict) and isinstance(st.get("rows"), list)
                and all(isinstance(r, dict) for r in st["rows"]) for st in stages.values()):
        raise UsageError(f"{path}: not a bench results file (format {RESULTS_FORMAT} of "
                         f"ingestor bench --json)")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def row_key(row: dict) -> str:
    """What names a row across runs: its text values (numbers are the figures)."""
    return " / ".join(str(v) for v in row.values()
                      if isinstance(v, str) and v not in _NO_FIGURE) or "-"


#: the text of a figure that could not be measured (not part of a row's name)
_NO_FIGURE = ("n/a", "not installed")


def compare(old: dict, new: dict) -> list[dict]:
    """Each figure in both runs: stage, row, column, old, new, new / old."""
    out = []
    for stage, st in new["stages"].items():
        before = old["stages"].get(stage)
        if not before:
            continue
        olds = {row_key(r): r for r in before["rows"]}
        for r in st["rows"]:
            o = olds.get(row_key(r))
            if o is None:
                continue
            for col, v in r.items():
                w = o.get(col)
                if _is_number(v) and _is_number(w):
                    out.append({"stage": stage, "row": row_key(r), "figure": col, "old": w,
                                "new": v, "new / old": v / w if w else None})
    return out


def _rate_columns(rows: list[dict]) -> list[str]:
    """The stage's rates (``.../s``, ``..._per_s``; not ratios such as ``a / b``, nor byte
    rates, another unit): what its
    chart shows, each an alternative when a row has several (batch, twin, kiteconnect)."""
    cols: list[str] = []
    for r in rows:
        for col, v in r.items():
            if (_is_number(v) and col not in cols and (col.endswith("/s") or col.endswith("per_s"))
                    and " / " not in col and not any(u in col for u in ("MB/s", "bytes"))):
                cols.append(col)
    return cols


def chart(results: dict, path: str) -> int:
    """A PNG with one panel per stage: each row's rates, the alternatives side by side (a log
    scale: they differ by orders of magnitude).  Returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for stage, st in results["stages"].items():
        cols = _rate_columns(st["rows"])
        rows = [r for r in st["rows"] if any(_is_number(r.get(c)) for c in cols)]
        if rows:
            panels.append((stage, cols, rows))
    if not panels:
        return 0
    height = sum(1.0 + 0.25 * len(rows) * len(cols) for _, cols, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, max(3.0, height)), squeeze=False)
    for ax, (stage, cols, rows) in zip(axes[:, 0], panels):
        width = 0.8 / len(cols)
        for j, col in enumerate(cols):
            ys = [i + j * width for i, r in enumerate(rows) if _is_number(r.get(col))]
            xs = [r[col] for r in rows if _is_number(r.get(col))]
            ax.barh(ys, xs, height=width, label=col)
        labels = [k if len(k) <= 50 else k[:47] + "..." for k in map(row_key, rows)]
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(f"{stage} (log scale)", fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3, which="both")
        if len(cols) > 1:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.set_xlabel(cols[0], fontsize=8)
    m = results.get("machine", {})
    fig.suptitle(f"ingestor bench, {results.get('started', '')[:16]}: {m.get('cpu', '?')}, "
                 f"{m.get('usable_cores', '?')} cores, core {m.get('core', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(panels)


def _need_matplotlib() -> None:
    from ingestor.cli import UsageError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--png needs matplotlib: pip install 'ingestor[bench]' (or pip "
                         "install matplotlib)") from None


def run(args) -> int:
    from ingestor import DEBUG
    from ingestor.cli import Failure, UsageError

    # every input is checked before minutes of benchmarks
    if args.png:
        _need_matplotlib()
    old = load_results(args.compare) if args.compare else None
    if args.results:
        if args.only or args.quick or args.dsn or args.json_out:
            raise UsageError("--results takes an earlier run's figures: --only, --quick, --dsn "
                             "and --json do not apply")
        if not (args.compare or args.png):
            raise UsageError("--results is for --compare or --png")
        results = load_results(args.results)
    else:
        results = _run_stages(args, DEBUG, Failure)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"\nresults: {args.json_out}")
    if old is not None:
        from ingestor.benchmarks import common

        rows = compare(old, results)
        om, nm = old.get("machine", {}), results.get("machine", {})
        print(f"\ncompared with {args.compare} ({old.get('started', '?')[:16]}, "
              f"core {om.get('core', '?')}, {om.get('cpu', '?')})")
        if om.get("core") != nm.get("core") or om.get("cpu") != nm.get("cpu"):
            print("note: the two runs differ in machine or core build: ratios are not the "
                  "change of the code alone")
        if rows:
            print(common.table(rows, "figure by figure (new / old > 1: more of it now)"))
        else:
            print("no figure in common (no stage and row of one run in the other)")
    if args.png:
        n = chart(results, args.png)
        print(f"chart: {args.png} ({n} stage(s))" if n else
              "no stage with a rate (.../s) to draw: no chart written")
    return 0


def _run_stages(args, debug: bool, failure) -> dict:
    from ingestor.benchmarks import common

    if args.dsn:
        os.environ["INGESTOR_BENCH_DSN"] = args.dsn
    results = {"format": RESULTS_FORMAT,
               "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "quick": bool(args.quick), "machine": machine_info(), "stages": {}}
    print(f"ingestor bench on {common.machine()}{' (DEBUG BUILD: figures not representative)' if debug else ''}")
    for stage in args.only or STAGES:
        mod = importlib.import_module(f"ingestor.benchmarks.{stage}")
        t0 = time.perf_counter()
        rows = mod.run(quick=args.quick)
        seconds = time.perf_counter() - t0
        print()
        print(common.table(rows, f"{mod.TITLE}  [{seconds:.0f} s]"))
        sys.stdout.flush()
        results["stages"][stage] = {
            "title": mod.TITLE, "seconds": round(seconds, 3),
            "rows": [{str(k): _clean(v) for k, v in r.items()} for r in rows]}
    return results
