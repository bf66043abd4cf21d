"""Decode stage: Kite binary messages to numpy buffers.

Messages of 50 packets each (LTP, quote, full, and a mix of all five packet
kinds; 20 000 messages, so the full-mode input (186 MB) streams from memory,
plus an "in-cache" column over 200 messages, as live messages arrive hot from
the socket), decoded by: the batch path (``KiteDecoder.feed_capture`` over an
in-memory capture: no Python call per message), ``KiteDecoder.feed`` and
``decode_kite`` (one Python call per message), the pure-Python struct twin,
and the official Kite client (``KiteTicker._parse_binary``).  Packets/s and
MB/s, medians of several runs; ratios against the official client.

Run: ``python -m ingestor.benchmarks.decode`` or ``ingestor bench --only decode``.
"""

from __future__ import annotations

import sys

import numpy as np

from ingestor.benchmarks.common import median_time, rss_mib, table

TITLE = "decode: Kite messages of 50 packets -> numpy (packets/s, one core)"
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


def run(quick: bool = False) -> list[dict]:
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
            for m in msgs:
                if not dec.feed(m):
                    dec.clear()
                    dec.feed(m)
            dec.clear()

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
    print(table(run(quick="--quick" in sys.argv), TITLE))
