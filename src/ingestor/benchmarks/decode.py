"""Decode stage: Kite and Angel One SmartStream binary messages to numpy buffers.

Messages of 50 packets each (LTP, quote, full, and a mix of all five packet
kinds; 20 000 messages, so the full-mode input (186 MB) streams from memory,
plus an "in-cache" column over 200 messages, as live messages arrive hot from
the socket), decoded by: the batch path (``KiteDecoder.feed_capture`` over an
in-memory capture: no Python call per message), ``KiteDecoder.feed`` and
``decode_kite`` (one Python call per message), the pure-Python struct twin,
and the official Kite client (``KiteTicker._parse_binary``).  Packets/s and
MB/s, medians of several runs; ratios against the official client.

SmartStream rows (``angel/<mode>``): one packet per message (LTP 51 bytes, QUOTE 123,
SNAP_QUOTE 379, DEPTH 443), 250 000 packets a mode over 1000 tokens (one session's
subscription limit) of every exchange type, as an in-memory capture (the SNAP_QUOTE one is
98 MB), decoded by the batch path (``SmartStreamDecoder.feed_capture``: the daemon's, over
the records its feed appended; per second of wall time, and per second of this process's
CPU time in the same runs, which a busy shared machine does not dilute), plus the in-cache
column, ``SmartStreamDecoder.feed`` (one Python call per message), the pure-Python twin and
the official Angel One client (``smartapi-python``, ``SmartWebSocketV2._parse_binary_data``;
"not installed" without the ``test`` extra).  The issue's bar: 10M SNAP_QUOTE packets/s on
one core through the batch path.

Run: ``python -m ingestor.benchmarks.decode`` or ``ingestor bench --only decode``.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from ingestor.benchmarks.common import median_time, rss_mib, table

TITLE = ("decode: Kite messages of 50 packets, Angel One messages of 1 packet -> numpy "
         "(packets/s, one core)")
PACKETS_PER_MESSAGE = 50

_LTP = np.dtype([("token", ">u4"), ("ltp", ">u4")])
_QUOTE = np.dtype([(n, ">u4") for n in ("token", "ltp", "ltq", "atp", "vol", "tbq", "tsq",
                                           "open", "high", "low", "close")])
_INDEX = np.dtype([(n, ">u4") for n in ("token", "ltp", "high", "low", "open", "close", "chg")])
_INDEX_FULL = np.dtype(_INDEX.descr + [("ts", ">u4")])
_LEVEL = [("q", ">u4"), ("p", ">u4"), ("o", ">u2"), ("pad", ">u2")]
_FULL = np.dtype(_QUOTE.descr + [(n, ">u4") for n in ("ltt", "oi", "oih", "oil", "ts")]
                 + [("depth", _LEVEL, (10,))])
_KINDS = {"ltp": _LTP, "quote": _QUOTE, "full": _FULL, "index_quote": _INDEX,
          "index_full": _INDEX_FULL}


def _feed_each(dec, msgs) -> None:
    """Each message through ``dec.feed()`` (one call per WebSocket message, as live), the
    buffers cleared when full."""
    for m in msgs:
        if not dec.feed(m):
            dec.clear()
            dec.feed(m)
    dec.clear()


def _packets(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` packets of one kind with plausible random values (big-endian records)."""
    dt = _KINDS[kind]
    a = np.zeros(n, dtype=dt)
    seg = 9 if kind.startswith("index") else rng.choice([1, 2, 3, 4, 5, 6, 7, 12], n)
    a["token"] = (rng.integers(1, 1 << 22, n) << 8) | seg
    price = rng.integers(1_000, 5_000_000, n)
    a["ltp"] = price
    for name in ("open", "high", "low", "close"):
        if name in dt.names:
            a[name] = price + rng.integers(-500, 500, n)
    for name in ("ltq", "vol", "tbq", "tsq", "oi", "oih", "oil", "atp"):
        if name in dt.names:
            a[name] = rng.integers(0, 1 << 31, n)
    for name in ("ltt", "ts"):
        if name in dt.names:
            a[name] = 1_700_000_000 + rng.integers(0, 100_000, n)
    if "depth" in dt.names:
        a["depth"]["q"] = rng.integers(0, 10_000, (n, 10))
        a["depth"]["p"] = price[:, None] + np.arange(-5, 5)
        a["depth"]["o"] = rng.integers(0, 100, (n, 10))
    return a


def make_messages(mode: str, n_messages: int, seed: int = 1) -> list[bytes]:
    """``n_messages`` messages of 50 packets: one kind, or ``mixed`` (all five)."""
    rng = np.random.default_rng(seed)
    kinds = list(_KINDS) if mode == "mixed" else [mode]
    total = n_messages * PACKETS_PER_MESSAGE
    which = rng.integers(0, len(kinds), total)
    framed = []
    for k, kind in enumerate(kinds):
        pk = _packets(kind, int((which == k).sum()), rng)
        fr = np.zeros(len(pk), dtype=[("len", ">u2"), ("pkt", pk.dtype)])
        fr["len"] = pk.dtype.itemsize
        fr["pkt"] = pk
        raw, size = fr.tobytes(), fr.dtype.itemsize
        framed.append(iter([raw[i:i + size] for i in range(0, len(raw), size)]))
    count = PACKETS_PER_MESSAGE.to_bytes(2, "big")
    msgs = []
    for m in range(n_messages):
        parts = [count]
        for i in range(m * PACKETS_PER_MESSAGE, (m + 1) * PACKETS_PER_MESSAGE):
            parts.append(next(framed[which[i]]))
        msgs.append(b"".join(parts))
    return msgs


def as_capture(msgs: list[bytes]) -> bytes:
    """The records of a capture holding ``msgs`` (without the file header)."""
    out = bytearray()
    for i, m in enumerate(msgs):
        out += (1_700_000_000_000_000_000 + i).to_bytes(8, "little") + b"\x01"
        out += len(m).to_bytes(4, "little") + m
    return bytes(out)


# SmartStream packets, little-endian, as one record of a capture each (the record header: receive
# time, kind 1 = binary, length), so that one numpy array is the whole capture
_SS_HEAD = [("mode", "u1"), ("etype", "u1"), ("token", "S25")]
_SS_LTP = _SS_HEAD + [("seq", "<i8"), ("ts", "<i8"), ("ltp", "<i8")]
_SS_QUOTE = _SS_LTP + [("ltq", "<i8"), ("atp", "<i8"), ("vol", "<i8"), ("tbq", "<f8"),
                       ("tsq", "<f8"), ("open", "<i8"), ("high", "<i8"), ("low", "<i8"),
                       ("close", "<i8")]
_SS_LEVEL5 = [("flag", "<i2"), ("q", "<i8"), ("p", "<i8"), ("o", "<u2")]
_SS_SNAP = _SS_QUOTE + [("ltt", "<i8"), ("oi", "<i8"), ("oic", "<f8"),
                        ("best5", _SS_LEVEL5, (10,)), ("circuits", "<i8", (4,))]
_SS_LEVEL20 = [("q", "<i4"), ("p", "<i4"), ("o", "<i2")]
_SS_DEPTH = _SS_HEAD + [("w27", "<i8"), ("w35", "<i8"), ("buy", _SS_LEVEL20, (20,)),
                        ("sell", _SS_LEVEL20, (20,))]
_SS_KINDS = {"ltp": (1, _SS_LTP, 51), "quote": (2, _SS_QUOTE, 123),
             "snap_quote": (3, _SS_SNAP, 379), "depth": (4, _SS_DEPTH, 443)}
SS_TOKENS = 1000       # one SmartStream session's subscription limit
_SS_RECORD_HEADER = 13  # a capture record's receive time (8), kind (1), length (4)


def smartstream_capture(mode: str, n: int, seed: int = 1) -> tuple[bytes, int]:
    """``n`` packets of one SmartStream mode as capture records (without the file header):
    ``(records, record size)``; random plausible values over ``SS_TOKENS`` tokens."""
    code, fields, size = _SS_KINDS[mode]
    pkt = np.dtype(fields)
    assert pkt.itemsize == size, (mode, pkt.itemsize)
    rec = np.dtype([("recv_ns", "<u8"), ("kind", "u1"), ("len", "<u4"), ("pkt", pkt)])
    assert rec.itemsize == _SS_RECORD_HEADER + size
    rng = np.random.default_rng(seed)
    a = np.zeros(n, dtype=rec)
    a["recv_ns"] = 1_700_000_000_000_000_000 + np.arange(n)
    a["kind"] = 1
    a["len"] = size
    p = a["pkt"]
    p["mode"] = code
    etypes = np.array([1, 2, 3, 4, 5, 7, 13], np.uint8)
    tok = rng.integers(0, SS_TOKENS, n)
    p["etype"] = etypes[tok % len(etypes)]
    names = np.array([str(10_000 + 37 * i).encode() for i in range(SS_TOKENS)], "S25")
    p["token"] = names[tok]
    price = rng.integers(1_000, 5_000_000, n)
    if mode == "depth":
        p["w27"] = rng.integers(0, 1 << 40, n)
        p["w35"] = 1_700_000_000_000 + np.arange(n)
        for side in ("buy", "sell"):
            p[side]["q"] = rng.integers(0, 10_000, (n, 20))
            p[side]["p"] = price[:, None] + np.arange(20)
            p[side]["o"] = rng.integers(0, 100, (n, 20))
        return a.tobytes(), rec.itemsize
    p["seq"] = rng.integers(0, 1 << 40, n)
    p["ts"] = 1_700_000_000_000 + np.arange(n)        # exchange time, ms
    p["ltp"] = price
    if mode == "ltp":
        return a.tobytes(), rec.itemsize
    for name in ("ltq", "atp", "vol"):
        p[name] = rng.integers(0, 1 << 31, n)
    for name in ("tbq", "tsq"):
        p[name] = rng.integers(0, 1 << 31, n).astype(np.float64)
    for name in ("open", "high", "low", "close"):
        p[name] = price + rng.integers(-500, 500, n)
    if mode == "snap_quote":
        p["ltt"] = 1_700_000_000 + rng.integers(0, 100_000, n)
        p["oi"] = rng.integers(0, 1 << 31, n)
        b = p["best5"]
        b["flag"][:, :5] = 1
        b["q"] = rng.integers(0, 10_000, (n, 10))
        b["p"] = price[:, None] + np.arange(-5, 5)
        b["o"] = rng.integers(0, 100, (n, 10))
    return a.tobytes(), rec.itemsize


def run_smartstream(quick: bool = False) -> list[dict]:
    """The SmartStream rows (see the module docstring)."""
    from ingestor._core import SmartStreamDecoder
    from ingestor.twin.smartstream import Keys, decode_message, official_parser

    official = official_parser()
    n_fast = 4_000 if quick else 250_000      # packets for the compiled paths
    n_feed = 2_000 if quick else 50_000       # for feed() (one Python call each)
    n_slow = 200 if quick else 4_000          # for the Python ones
    n_hot = 10_000                            # in-cache: about 4 MB of SNAP_QUOTE records
    repeat = 2 if quick else 11               # runs of 25-50 ms: more of them
    rows = []
    for mode in _SS_KINDS:
        cap, rsize = smartstream_capture(mode, n_fast)
        msgs = [cap[i + _SS_RECORD_HEADER:i + rsize]
                for i in range(0, min(n_feed, n_fast) * rsize, rsize)]
        slow = msgs[:n_slow]
        hot = cap[:min(n_hot, n_fast) * rsize]
        dec = SmartStreamDecoder(capacity=16384)

        def batch(chunk):
            pos, seq = 0, 0
            while pos < len(chunk):
                pos, seq, _ = dec.feed_capture(chunk, pos, seq)
                dec.clear()

        batch(cap)                    # every token met once: the key table is warm
        dec.reset_stats()
        rss0 = rss_mib()
        # wall time (as every other figure), and this process's CPU time in the same runs:
        # on a shared machine the wall time also counts the time other processes had the core
        cpu: list[float] = []

        def timed_batch():
            c0 = time.process_time()
            batch(cap)
            cpu.append(time.process_time() - c0)

        t_batch = median_time(timed_batch, repeat)
        t_cpu = statistics.median(cpu[1:])          # (the first: median_time's warm-up)
        rss1 = rss_mib()
        st = dec.stats()
        # every packet decoded, none set aside: the figures are of the whole path
        assert st["packets"] == n_fast * (repeat + 1) and st["malformed_messages"] == 0, st
        t_hot = median_time(lambda: batch(hot), repeat * 3)

        def per_message_feed():
            _feed_each(dec, msgs)

        t_feed = median_time(per_message_feed, repeat)
        keys = Keys()
        t_twin = median_time(lambda: [decode_message(m, keys=keys) for m in slow],
                             max(1, repeat // 2))
        t_off = median_time(lambda: [official._parse_binary_data(m) for m in slow],
                            max(1, repeat // 2)) if official is not None else None
        off_rate = n_slow / t_off if t_off else None
        rows.append({
            "mode": f"angel/{mode}",
            "batch pkt/s": n_fast / t_batch,
            "batch MB/s": len(cap) / t_batch / 1e6,
            "batch pkt/CPU-s": n_fast / t_cpu if t_cpu > 0 else "n/a",
            "batch in-cache pkt/s": len(hot) / rsize / t_hot,
            "feed() pkt/s": len(msgs) / t_feed,
            "twin pkt/s": n_slow / t_twin,
            "smartapi pkt/s": off_rate or "not installed",
            "batch / smartapi": (n_fast / t_batch) / off_rate if off_rate else "not installed",
            "RSS growth MiB": rss1 - rss0,
        })
    return rows


def run(quick: bool = False) -> list[dict]:
    """The Kite rows, then the SmartStream ones."""
    return run_kite(quick) + run_smartstream(quick)


def run_kite(quick: bool = False) -> list[dict]:
    from ingestor import KiteDecoder, decode_kite

    try:
        from kiteconnect import KiteTicker

        kite = KiteTicker.__new__(KiteTicker)
    except ImportError:  # the test extra is not installed
        kite = None
    try:
        from ingestor.twin.frames import decode_message as twin_decode
    except ImportError:
        twin_decode = None

    n_fast = 400 if quick else 20_000     # messages for the compiled paths
    n_slow = 40 if quick else 400         # for the Python ones
    repeat = 2 if quick else 7
    rows = []
    for mode in ("ltp", "quote", "full", "mixed"):
        msgs = make_messages(mode, n_fast)
        nbytes = sum(map(len, msgs))
        cap = as_capture(msgs)
        packets = n_fast * PACKETS_PER_MESSAGE
        dec = KiteDecoder(capacity=8192)

        def batch():
            pos, seq = 0, 0
            while pos < len(cap):
                pos, seq, _ = dec.feed_capture(cap, pos, seq)
                dec.clear()

        def per_message_feed():
            _feed_each(dec, msgs)

        def per_message_api():
            for m in msgs:
                decode_kite(m)

        rss0 = rss_mib()
        t_batch = median_time(batch, repeat)
        rss1 = rss_mib()
        # the same on a working set that fits the caches, as live messages do
        hot = as_capture(msgs[:200])

        def batch_hot():
            pos, seq = 0, 0
            while pos < len(hot):
                pos, seq, _ = dec.feed_capture(hot, pos, seq)
                dec.clear()

        t_hot = median_time(batch_hot, repeat * 3)
        t_feed = median_time(per_message_feed, repeat)
        t_api = median_time(per_message_api, repeat)
        slow = msgs[:n_slow]
        slow_packets = n_slow * PACKETS_PER_MESSAGE
        t_twin = median_time(lambda: [twin_decode(m) for m in slow], max(1, repeat // 2)) \
            if twin_decode else None
        t_kite = median_time(lambda: [kite._parse_binary(m) for m in slow], max(1, repeat // 2)) \
            if kite else None
        kite_rate = slow_packets / t_kite if t_kite else None
        row = {
            "mode": mode,
            "batch pkt/s": packets / t_batch,
            "batch MB/s": nbytes / t_batch / 1e6,
            "batch in-cache pkt/s": 200 * PACKETS_PER_MESSAGE / t_hot,
            "feed() pkt/s": packets / t_feed,
            "decode_kite() pkt/s": packets / t_api,
            "twin pkt/s": slow_packets / t_twin if t_twin else "n/a",
            "kiteconnect pkt/s": kite_rate or "n/a",
            "batch / kiteconnect": (packets / t_batch) / kite_rate if kite_rate else "n/a",
            "RSS growth MiB": rss1 - rss0,
        }
        rows.append(row)
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(table(run_kite(quick), TITLE.split(",")[0] + " -> numpy (packets/s, one core)"))
    print()
    print(table(run_smartstream(quick),
                "decode: Angel One SmartStream messages (1 packet each) -> numpy "
                "(packets/s, one core)"))
