"""Fuzzing the SmartStream decoder with hostile messages (run on the debug build).

Random bytes and mutated well-formed frames (bit flips, truncation anywhere, a mode byte or
an exchange type that does not exist, tokens that are empty, unprintable or 25 bytes without
a NUL, trailing bytes, negative and huge prices) go through ``SmartStreamDecoder.feed``
(small buffers: the not-enough-room path) and ``feed_capture``.  Nothing may crash or read
out of bounds, and the statistics must equal the twin's and account for every message.
"""

from __future__ import annotations

import random
import struct
import warnings

import pytest

import ingestor
from ingestor._core import SmartStreamDecoder
from ingestor.twin.smartstream import (Keys, TwinStats, core_records, decode_message,
                                       encode_depth, encode_ltp, encode_quote,
                                       encode_snap_quote, split_records, walk_capture)

N_MESSAGES = 4000
ETYPES = [1, 2, 3, 4, 5, 7, 13]


@pytest.fixture(scope="module", autouse=True)
def report_build():
    if not ingestor.DEBUG:
        warnings.warn("fuzzing a release build of ingestor._core; build with INGESTOR_DEBUG=1 "
                      "for bounds and invariant checks", stacklevel=1)
    yield


def _valid(rng: random.Random) -> bytes:
    et, tok = rng.choice(ETYPES), str(rng.randrange(1, 10**8))
    p = lambda: rng.randrange(0, 10**7)  # noqa: E731
    mode = rng.randrange(1, 5)
    if mode == 1:
        return encode_ltp(et, tok, p(), rng.randrange(1 << 40), 1_700_000_000_000 + p())
    if mode == 2:
        return encode_quote(et, tok, p(), 1, 1_700_000_000_000, p(), p(), p(), float(p()),
                            float(p()), p(), p(), p(), p())
    if mode == 3:
        return encode_snap_quote(et, tok, p(), 1, 1_700_000_000_000, p(), p(), p(), 1.0, 2.0,
                                 p(), p(), p(), p(), 1_700_000_000, p(), 0.5,
                                 [p() for _ in range(5)], [p() for _ in range(5)],
                                 [rng.randrange(1 << 16) for _ in range(5)],
                                 [p() for _ in range(5)], [p() for _ in range(5)],
                                 [rng.randrange(1 << 16) for _ in range(5)])
    return encode_depth(et, tok, 1, 2, [(p(), p(), 1)] * rng.randrange(21),
                        [(p(), p(), 2)] * rng.randrange(21))


def _mutate(rng: random.Random, msg: bytes) -> bytes:
    b = bytearray(msg)
    op = rng.randrange(10)
    if op == 0 and b:  # bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncated anywhere
        del b[rng.randrange(len(b) + 1):]
    elif op == 2 and b:  # a mode that does not exist, or another mode's length
        b[0] = rng.choice([0, 5, 6, 0x80, 0xFF, 1, 2, 3, 4])
    elif op == 3 and len(b) > 1:  # an exchange type that does not exist
        b[1] = rng.choice([0, 6, 8, 12, 14, 0xFF])
    elif op == 4 and len(b) >= 27:  # hostile tokens
        b[2:27] = rng.choice([b"\x00" * 25, b"9" * 25, b" 12" + b"\x00" * 22,
                              bytes(rng.randrange(256) for _ in range(25))])
    elif op == 5:  # trailing bytes
        b += rng.randbytes(rng.randint(1, 30))
    elif op == 6 and len(b) >= 51:  # a negative or huge last price
        b[43:51] = struct.pack("<q", rng.choice([-1, 1 << 32, -(1 << 63), (1 << 63) - 1]))
    elif op == 7:
        b = bytearray(rng.choice([b"", b"\x01", b"\x03\x02", b"\x04" * 442, b"\x01" * 51]))
    elif op == 8:  # random bytes
        b = bytearray(rng.randbytes(rng.randint(0, 500)))
    else:  # random bytes behind a plausible head
        b = bytearray(bytes([rng.randrange(1, 5), rng.choice(ETYPES)])
                      + rng.randbytes(rng.choice([49, 121, 377, 441, 600])))
    return bytes(b)


def _corpus(rng: random.Random) -> list[bytes]:
    valid = [_valid(rng) for _ in range(N_MESSAGES // 3)]
    out = list(valid)
    for _ in range(N_MESSAGES - len(valid)):
        m = rng.choice(valid)
        for _ in range(rng.choice([1, 1, 2, 3])):
            m = _mutate(rng, m)
        out.append(m)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("capacity", [1, 3, 64])
def test_feed_never_crashes_and_counts_every_message(rng, capacity):
    corpus = _corpus(rng)
    dec = SmartStreamDecoder(capacity, depth_capacity=max(1, capacity // 2))
    stats, keys = TwinStats(), Keys()
    want, got_t, got_d = [], [], []
    for seq, msg in enumerate(corpus):
        want += decode_message(msg, seq, seq, stats, keys)
        if not dec.feed(msg, seq, seq):
            t, d = core_records(dec)
            got_t, got_d = got_t + t, got_d + d
            dec.clear()
            assert dec.feed(msg, seq, seq)
        # every buffer type is accepted
        if seq % 97 == 0:
            for view in (bytearray(msg), memoryview(msg)):
                probe = SmartStreamDecoder(4)
                assert probe.feed(view)
    t, d = core_records(dec)
    assert (got_t + t, got_d + d) == split_records(want)
    s = dec.stats()
    assert s == stats.as_dict()
    assert s["messages"] == len(corpus) and s["bytes"] == sum(map(len, corpus))
    assert s["packets"] == len(want) == s["ltp"] + s["quote"] + s["snap_quote"] + s["depth"]
    for reason in ("empty_message", "unknown_mode", "short", "trailing_bytes",
                   "unknown_exchange", "bad_token", "out_of_range", "malformed_messages"):
        assert s[reason] > 0, reason


def test_feed_capture_never_crashes(rng):
    corpus = _corpus(rng)
    kinds = [rng.choices([1, 2, 0, 7], weights=[90, 5, 2, 3])[0] for _ in corpus]
    chunk = b"".join(struct.pack("<QBI", 10_000 + i, k, len(m)) + m
                     for i, (k, m) in enumerate(zip(kinds, corpus)))
    stats = TwinStats()
    want, texts, end, end_seq = walk_capture(chunk, 0, 0, stats, Keys())
    dec = SmartStreamDecoder(2, text_capacity=2)
    got_t, got_d, got_texts = [], [], []
    pos, seq = 0, 0
    while True:
        pos, seq, full = dec.feed_capture(chunk, pos, seq)
        t, d = core_records(dec)
        got_t, got_d = got_t + t, got_d + d
        got_texts += [tuple(int(x) for x in r) for r in dec.texts[:dec.n_texts].tolist()]
        dec.clear()
        if not full:
            break
    assert (pos, seq) == (end, end_seq) == (len(chunk), len(corpus))
    assert (got_t, got_d) == split_records(want)
    assert got_texts == texts
    s = dec.stats()
    assert s == stats.as_dict()
    assert s["messages"] == kinds.count(1) and s["text_messages"] == kinds.count(2)
    assert s["bad_records"] == len(kinds) - kinds.count(1) - kinds.count(2)


def test_truncated_capture_stops_before_the_partial_record(rng):
    msgs = [_valid(rng) for _ in range(20)]
    chunk = b"".join(struct.pack("<QBI", i, 1, len(m)) + m for i, m in enumerate(msgs))
    for cut in sorted(rng.sample(range(len(chunk) + 1), 30)) + [0, 12, 13, len(chunk)]:
        want, _, wpos, wseq = walk_capture(chunk[:cut], 0, 0, None, Keys())
        dec = SmartStreamDecoder(1 << 10)
        pos, seq, full = dec.feed_capture(chunk[:cut], 0, 0)
        assert not full and (pos, seq) == (wpos, wseq)
        assert core_records(dec) == split_records(want)
