"""``ingestor simulate``: a simulated Kite market, written to a capture file.

``ingestor simulate --out FILE.cap --ticks N [--tokens K] [--mode M] [--seed S]
[--instruments-csv FILE.csv]`` writes a deterministic capture (see
``ingestor.simulator``) and prints a one-line summary.  The parser is built
in groups (``output`` for the capture; the model's options shared) so the
live Kite-protocol server's options can join it as another group.
"""

from __future__ import annotations

import argparse
import time

from ingestor.cli import UsageError

MODES = ("ltp", "quote", "full", "mixed")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="simulate a Kite market (capture file)",
        description="Write a realistic, seeded Kite capture: random walks on tick grids "
                    "across all segments, depth ladders, heartbeats between bursts.")
    model = p.add_argument_group("market model")
    model.add_argument("--tokens", type=int, default=100, metavar="K",
                       help="instruments in the simulated universe (default 100)")
    model.add_argument("--mode", choices=MODES, default="mixed",
                       help="packet mode of every instrument, or mixed (default)")
    model.add_argument("--seed", type=int, default=0, metavar="S",
                       help="random seed: same seed, same output (default 0)")
    model.add_argument("--instruments-csv", metavar="FILE.csv",
                       help="also write the universe as a Kite instruments dump")
    out = p.add_argument_group("capture output")
    out.add_argument("--out", metavar="FILE.cap", help="capture file to write")
    out.add_argument("--ticks", type=int, metavar="N", help="packets to write")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ingestor.simulator import Market, generate_capture

    if args.tokens < 1:
        raise UsageError("simulate: --tokens must be at least 1")
    if args.seed < 0:
        raise UsageError("simulate: --seed must be non-negative")
    if args.out is None or args.ticks is None:
        raise UsageError("simulate: --out FILE.cap and --ticks N are required")
    if args.ticks < 0:
        raise UsageError("simulate: --ticks must be non-negative")
    market = Market(n_tokens=args.tokens, seed=args.seed)
    if args.instruments_csv:
        try:
            market.write_instruments_csv(args.instruments_csv)
        except OSError as exc:
            raise UsageError(f"simulate: cannot write {args.instruments_csv}: {exc.strerror}") from None
    t0 = time.perf_counter()
    try:
        r = generate_capture(args.out, args.ticks, mode=args.mode, seed=args.seed, market=market)
    except OSError as exc:
        raise UsageError(f"simulate: cannot write {args.out}: {exc.strerror}") from None
    dt = time.perf_counter() - t0
    print(f"simulate: wrote {args.out}: {r['packets']} ticks in {r['messages']} messages "
          f"({r['heartbeats']} heartbeats), {r['tokens']} instruments, mode {args.mode}, "
          f"seed {args.seed}, {r['sessions']} session(s), {r['bytes']} bytes in {dt:.2f} s")
    return 0
