"""Random Kite tick streams for the aggregation tests: packets encoded as the
broker sends them (Kite Connect v3 "Quote packet structure"), grouped into
binary messages, then decoded by the real ``KiteDecoder``.

A stream is a list of ``Tick`` events; ``messages`` groups them into
(recv_ns, seq, message bytes) with one sequence number per message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

#: Segments used: NSE (100), NFO (100), CDS (1e7), BCD (1e4), INDICES (100), NCO (1e4).
SEGMENTS = (1, 2, 3, 6, 9, 12)


@dataclass
class Tick:
    token: int
    length: int            # 8, 28, 32, 44, 184
    recv_ns: int
    price: int
    quantity: int = 0
    volume: int = 0
    oi: int = 0
    exchange_ts: int = 0
    total_buy: int = 0
    total_sell: int = 0
    book: list = field(default_factory=list)  # 10 (qty, price, orders): 5 bids, 5 asks


def encode_packet(t: Tick) -> bytes:
    if t.length == 8:
        return struct.pack(">II", t.token, t.price)
    if t.length in (28, 32):
        p = struct.pack(">IIIIIIi", t.token, t.price, t.price + 5, max(t.price - 5, 0),
                        t.price, t.price, 0)
        if t.length == 32:
            p += struct.pack(">I", t.exchange_ts)
        return p
    p = struct.pack(">IIIIIIIIIII", t.token, t.price, t.quantity, t.price, t.volume,
                    t.total_buy, t.total_sell, t.price, t.price, t.price, t.price)
    if t.length == 44:
        return p
    p += struct.pack(">IIIII", 0, t.oi, t.oi, t.oi, t.exchange_ts)
    book = t.book or [(0, 0, 0)] * 10
    for qty, price, orders in book:
        p += struct.pack(">IIHH", qty, price, orders, 0)
    assert len(p) == 184
    return p


def encode_message(ticks: list[Tick]) -> bytes:
    out = [struct.pack(">H", len(ticks))]
    for t in ticks:
        p = encode_packet(t)
        out.append(struct.pack(">H", len(p)) + p)
    return b"".join(out)


def random_stream(rng, n_ticks: int, n_instruments: int, *, start_ns: int = 1_700_000_000_000_000_000,
                  max_step_ns: int = 3_000_000_000, big: bool = True,
                  traded: int = 0) -> list[Tick]:
    """A random mixed stream: every mode, volume resets, duplicate and backwards times.
    The first ``traded`` instruments are neither indices nor LTP-only: they carry volume
    whatever the seed."""
    tokens = []
    seen = set()
    while len(tokens) < n_instruments:
        segs = SEGMENTS if len(tokens) >= traded else [s for s in SEGMENTS if s != 9]
        tok = (rng.randrange(1, 1 << 24) << 8) | rng.choice(segs)
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    ltp_only = {tok for tok in tokens[traded:] if rng.random() < 0.15}
    cum = {}
    now = start_ns
    out = []
    for _ in range(n_ticks):
        r = rng.random()
        if r < 0.1:
            step = 0                                   # duplicate receive time
        elif r < 0.15:
            step = -rng.randrange(1, 5_000_000_000)    # clock went back
        elif r < 0.2:
            step = rng.randrange(1, 200_000_000_000)   # a long gap (new buckets, new day)
        else:
            step = rng.randrange(1, max_step_ns)
        now += step
        tok = rng.choice(tokens)
        seg = tok & 0xFF
        if tok in ltp_only:
            length = 8
        elif seg == 9:
            length = rng.choice((8, 28, 32))
        else:
            length = rng.choice((8, 44, 184, 184))
        hi = (1 << 32) - 1 if big and rng.random() < 0.2 else 500_000
        price = rng.randrange(1, hi)
        v = cum.get(tok, rng.randrange(0, 1000))
        r = rng.random()
        if r < 0.05:
            v = rng.randrange(0, max(1, v))            # session rollover: cumulative falls
        elif r < 0.2:
            pass                                       # unchanged
        elif big and r < 0.25:
            v = min((1 << 32) - 1, v + rng.randrange(0, 1 << 31))
        else:
            v = min((1 << 32) - 1, v + rng.randrange(1, 5000))
        t = Tick(token=tok, length=length, recv_ns=now, price=price)
        if length in (44, 184):
            cum[tok] = v
            t.volume = v
            t.quantity = rng.randrange(0, 1000)
            t.total_buy = rng.randrange(0, 1 << 32)
            t.total_sell = rng.randrange(0, 1 << 32)
        if length in (32, 184):
            t.exchange_ts = 0 if rng.random() < 0.2 else now // 1_000_000_000 - rng.randrange(0, 3)
        if length == 184:
            t.oi = rng.randrange(0, 1 << 32)
            t.book = [(rng.randrange(0, 1 << 32) if rng.random() < 0.9 else 0,
                       rng.randrange(0, 1 << 32), rng.randrange(0, 1 << 16)) for _ in range(10)]
        out.append(t)
    return out


def messages(rng, stream: list[Tick], max_per_message: int = 4):
    """Group a stream into messages: (recv_ns, seq, bytes); a message's ticks share
    the first tick's receive time, as the daemon stamps a whole message."""
    out = []
    i = 0
    seq = 0
    while i < len(stream):
        k = rng.randrange(1, max_per_message + 1)
        group = stream[i:i + k]
        out.append((group[0].recv_ns, seq, encode_message(group)))
        seq += 1
        i += k
    return out
