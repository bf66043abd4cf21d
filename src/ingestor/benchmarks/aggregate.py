"""Benchmark of the aggregation stage: decoded ticks -> tick rows + candles + depth.

Measures ``ingestor._core.Engine.process`` (tick rows, the 7 default candle
timeframes, book snapshots every second) on synthetic but realistic mixed
data — 2 000 instruments with a skewed popularity, 10 % LTP, 50 % quote and
40 % full packets, messages of ~20 packets, ~200k ticks/s of feed time so
buckets close as they would live — against the pure-Python twin
(``ingestor.twin.candles``) in the same run.  The output buffers are drained
(discarded) whenever they fill, as the writer would drain them.  Figures are
the median of several runs on one core; build the core in release mode
(without ``INGESTOR_DEBUG``) first.

Usage: ``python -m ingestor.benchmarks.aggregate [--quick]``; ``run(quick)`` returns
the table's rows for ``ingestor bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ingestor import _core
from ingestor.twin import candles as twin

SEGMENTS = np.array([1, 1, 1, 2, 2, 2, 3, 6, 9, 12], dtype=np.uint32)
DIVISORS = {3: 10_000_000, 6: 10_000, 12: 10_000}


TITLE = "aggregate: decoded ticks -> tick rows + candles + depth snapshots (ticks/s, one core)"


def make_ticks(n: int, n_instruments: int = 2000, seed: int = 7):
    """``n`` decoded ticks (TICK_DTYPE) and their books (DEPTH_DTYPE)."""
    rng = np.random.default_rng(seed)
    seg = SEGMENTS[rng.integers(0, len(SEGMENTS), n_instruments)]
    tokens = (rng.choice(1 << 20, n_instruments, replace=False).astype(np.uint32) << 8) | seg
    # popularity: Zipf-like weights, so a few instruments tick most
    weights = 1.0 / np.arange(1, n_instruments + 1) ** 0.8
    inst = rng.choice(n_instruments, n, p=weights / weights.sum())
    ticks = np.zeros(n, dtype=_core.TICK_DTYPE)
    tok = tokens[inst]
    segment = tok & 0xFF
    ticks["instrument_token"] = tok
    ticks["segment"] = segment
    ticks["divisor"] = np.array([DIVISORS.get(s, 100) for s in range(256)], dtype=np.uint32)[segment]
    r = rng.random(n)
    index = segment == 9
    length = np.where(r < 0.1, 8, np.where(r < 0.6, 44, 184)).astype(np.uint16)
    length[index] = np.where(r[index] < 0.5, 28, 32)
    ticks["length"] = length
    ticks["mode"] = np.where(length == 8, 1, np.where((length == 44) | (length == 28), 2, 3))
    # messages of ~20 packets, ~10k messages/s of feed time
    msg = np.cumsum(rng.random(n) < 0.05)
    ticks["seq"] = msg
    ticks["recv_ns"] = 1_700_000_000_000_000_000 + msg.astype(np.int64) * 100_000 \
        + rng.integers(0, 50_000, n)[msg % n]
    base = rng.integers(1_000, 5_000_000, n_instruments)
    ticks["last_price"] = base[inst] + rng.integers(0, 200, n)
    has_vol = (length == 44) | (length == 184)
    # cumulative volume: per instrument running sums of small trades
    step = rng.integers(1, 500, n) * has_vol
    order = np.argsort(inst, kind="stable")
    cum = np.empty(n, dtype=np.int64)
    cs = np.cumsum(step[order])
    first = np.r_[0, np.nonzero(np.diff(inst[order]))[0] + 1]
    offsets = np.repeat(cs[first] - step[order][first], np.diff(np.r_[first, n]))
    cum[order] = cs - offsets
    ticks["volume_traded"] = np.where(has_vol, cum % (1 << 32), 0)
    ticks["last_traded_quantity"] = np.where(has_vol, step, 0)
    ticks["total_buy_quantity"] = rng.integers(0, 1 << 20, n) * has_vol
    ticks["total_sell_quantity"] = rng.integers(0, 1 << 20, n) * has_vol
    full = length == 184
    ticks["oi"] = np.where(full, rng.integers(0, 1 << 24, n), 0)
    ticks["exchange_timestamp"] = np.where(full | (length == 32), ticks["recv_ns"] // 10**9, 0)
    nfull = int(full.sum())
    ticks["depth_row"] = -1
    ticks["depth_row"][full] = np.arange(nfull)
    depth = np.zeros(nfull, dtype=_core.DEPTH_DTYPE)
    depth["tick_row"] = np.nonzero(full)[0]
    p = ticks["last_price"][full][:, None]
    depth["bid_price"] = p - np.arange(1, 6)
    depth["ask_price"] = p + np.arange(1, 6)
    depth["bid_quantity"] = rng.integers(1, 10_000, (nfull, 5))
    depth["ask_quantity"] = rng.integers(1, 10_000, (nfull, 5))
    depth["bid_orders"] = rng.integers(1, 50, (nfull, 5))
    depth["ask_orders"] = rng.integers(1, 50, (nfull, 5))
    return ticks, depth, np.unique(tokens)


def _core_once(ticks, depth, tokens, timeframes) -> tuple[float, int, int]:
    eng = _core.Engine(timeframes=timeframes, tick_capacity=65536, candle_capacity=1 << 18,
                       snapshot_capacity=65536, instrument_capacity=len(tokens))
    eng.set_instruments(tokens, np.arange(1, len(tokens) + 1))
    n = len(ticks)
    pos = 0
    candles = snaps = 0
    t0 = time.perf_counter()
    while True:
        pos = eng.process(ticks, pos, depth=depth)
        candles += eng.n_candles
        snaps += eng.n_snapshots
        eng.clear()     # the writer's drain
        if pos == n:
            break
    while not eng.flush():
        candles += eng.n_candles
        eng.clear()
    elapsed = time.perf_counter() - t0
    return elapsed, candles + eng.n_candles, snaps + eng.n_snapshots


def _twin_once(ticks, depth, tokens) -> float:
    eng = twin.Engine()
    for i, tok in enumerate(tokens.tolist()):
        eng.set_instrument(tok, i + 1)
    t0 = time.perf_counter()
    eng.process(ticks, depth)
    eng.flush()
    return time.perf_counter() - t0


def run(quick: bool = False, instruments: int = 2000) -> list[dict]:
    """Run the benchmark; one dict per table row."""
    n = 300_000 if quick else 3_000_000
    repeats = 3 if quick else 5
    ticks, depth, tokens = make_ticks(n, instruments)
    rows = []
    for label, tfs in (("core: tick rows + 7 timeframes + depth", twin.DEFAULT_TIMEFRAMES),
                       ("core: tick rows + 1 timeframe + depth", ("1m",))):
        times = []
        for _ in range(repeats):
            elapsed, candles, snaps = _core_once(ticks, depth, tokens, tfs)
            times.append(elapsed)
        med = statistics.median(times)
        rows.append({"stage": label, "ticks": n, "seconds": med, "ticks_per_s": n / med,
                     "candles": candles, "snapshots": snaps})
    # The twin is slow: time it on a slice and report its rate.
    m = 10_000 if quick else 40_000
    sl = ticks[:m]
    ndepth = int((sl["length"] == 184).sum())
    times = [_twin_once(sl, depth[:ndepth], tokens) for _ in range(1 if quick else 3)]
    med = statistics.median(times)
    rows.append({"stage": "twin (pure Python): same, 7 timeframes", "ticks": m, "seconds": med,
                 "ticks_per_s": m / med, "candles": None, "snapshots": None})
    for r in rows:
        r["vs_twin"] = r["ticks_per_s"] / rows[-1]["ticks_per_s"]
    state = len(tokens) * (64 * 7 + _core.SNAPSHOT_DTYPE.itemsize + 48)
    rows.append({"stage": f"engine state for {len(tokens)} instruments (bytes, ~)",
                 "ticks": None, "seconds": None, "ticks_per_s": None, "candles": None,
                 "snapshots": None, "vs_twin": None, "state_bytes": state})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<44} {'ticks':>10} {'median s':>9} {'ticks/s':>14} {'x twin':>8}"]
    for r in rows:
        if r["ticks"] is None:
            lines.append(f"{r['stage']:<44} {r['state_bytes']:>10,}")
            continue
        lines.append(f"{r['stage']:<44} {r['ticks']:>10,} {r['seconds']:>9.4f} "
                     f"{r['ticks_per_s']:>14,.0f} {r['vs_twin']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer ticks and runs")
    ap.add_argument("--instruments", type=int, default=2000, help="instruments in the data")
    args = ap.parse_args()
    if _core.DEBUG:
        print("warning: the core is a debug build (INGESTOR_DEBUG=1); figures are not representative")
    print(format_table(run(args.quick, args.instruments)))


if __name__ == "__main__":
    main()
