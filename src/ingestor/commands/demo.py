"""``ingestor demo``: the README's main job.

Generates a realistic capture with the offline Kite simulator (all segments,
mixed modes, heartbeats), decodes it through the batch path, and prints what
was decoded: counts per mode and message kind, a few ticks as JSON, ticks/s.
"""

from __future__ import annotations

import os
import time


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate a demo capture and decode it",
                       description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="demo", help="where to write the demo files (default: ./demo)")
    p.add_argument("--ticks", type=int, default=500_000, help="ticks to simulate")
    p.add_argument("--tokens", type=int, default=500, help="instruments to simulate")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def run(args) -> int:
    import msgspec

    from ingestor._core import KiteDecoder
    from ingestor.batch import decode_capture
    from ingestor.capture import CaptureReader
    from ingestor.commands.decode import format_summary, summarize
    from ingestor.jsonl import tick_dicts
    from ingestor.simulator import generate_capture

    os.makedirs(args.dir, exist_ok=True)
    cap = os.path.join(args.dir, "demo.cap")
    t0 = time.perf_counter()
    generate_capture(cap, ticks=args.ticks, tokens=args.tokens, mode="mixed", seed=args.seed)
    gen_s = time.perf_counter() - t0
    print(f"simulated {args.ticks:,} ticks of {args.tokens} instruments into {cap} "
          f"({os.path.getsize(cap) / 1e6:.1f} MB) in {gen_s:.1f} s")

    dec = KiteDecoder(capacity=1 << 15)
    samples: dict[str, dict] = {}
    reader = CaptureReader(cap)
    t0 = time.perf_counter()
    with reader:
        for _ in decode_capture(cap, dec, reader=reader):
            if len(samples) < 5 and dec.n_ticks:
                for d in tick_dicts(dec.ticks[:min(dec.n_ticks, 500)], dec.depth[:dec.n_depth]):
                    key = f"{d['mode']}{'' if d['tradable'] else ' (index)'}"
                    samples.setdefault(key, d)
    seconds = time.perf_counter() - t0
    print(format_summary(summarize(dec.stats(), seconds, reader)))
    print("one tick of each kind, as `ingestor decode --jsonl` prints them:")
    for d in samples.values():
        if "depth" in d:
            d = dict(d, depth={side: levels[:2] + ["..."] for side, levels in d["depth"].items()})
        print("  " + msgspec.json.encode(d).decode())
    return 0
