"""Fuzzing the decoder with hostile messages (run on the debug build).

Random bytes and mutated real messages (bit flips, truncation, length
fields pointing past the end, huge counts, 0- and 1-byte messages, unknown
packet lengths, trailing bytes) go through ``decode_kite``,
``KiteDecoder.feed`` (small buffers: the not-enough-room path and growth)
and ``KiteDecoder.feed_capture``.  Nothing may crash, and the statistics
must equal the twin's and account for every message.  The debug build
(``INGESTOR_DEBUG=1``) adds bounds and invariant checks that abort on a bad
read; which build ran is written to the test output.
"""

from __future__ import annotations

import random
import struct
import warnings

import pytest

import ingestor
from ingestor import KiteDecoder, decode_kite
from ingestor.sim.market import Market
from ingestor.twin.frames import TwinStats, decode_message, encode_message, walk_capture
from kite_compare import assert_twin_equal, decoder_rows, records

N_MESSAGES = 3000


@pytest.fixture(scope="module", autouse=True)
def report_build(request):
    build = "debug (bounds and invariant checks on)" if ingestor.DEBUG else "RELEASE"
    line = f"[fuzz] ingestor.DEBUG={ingestor.DEBUG}: {build} build"
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capman is not None and reporter is not None:
        with capman.global_and_fixture_disabled():  # past output capture, to the terminal
            reporter.write_line("")
            reporter.write_line(line)
    else:
        print(line)
    if not ingestor.DEBUG:
        warnings.warn("fuzzing a release build of ingestor._core; build with INGESTOR_DEBUG=1 "
                      "for bounds and invariant checks", stacklevel=1)
    yield


def _valid_messages(rng: random.Random, n: int) -> list[bytes]:
    market = Market(n_tokens=40, seed=rng.randrange(1 << 31))
    subs = [(int(t), rng.choice(["ltp", "quote", "full"])) for t in market.tokens]
    return [market.message(subs, rng.randint(1, 12)) for _ in range(n)]


def _mutate(rng: random.Random, msg: bytes) -> bytes:
    b = bytearray(msg)
    op = rng.randrange(11)
    if len(b) < 4 and op in (2, 3, 4, 6):  # these rewrite header fields
        op = 8
    if op == 0:  # bit flips anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncated anywhere
        del b[rng.randrange(len(b) + 1):]
    elif op == 2:  # the count says more packets than there are
        struct.pack_into(">H", b, 0, min(0xFFFF, struct.unpack_from(">H", b)[0] + rng.randint(1, 3)))
    elif op == 3:  # huge count
        struct.pack_into(">H", b, 0, rng.choice([0xFFFF, 0x8000, 0x7FFF]))
    elif op == 4:  # a length field pointing past the end
        struct.pack_into(">H", b, 2, rng.choice([len(b), 0xFFFF, len(b) - 3, 185]))
    elif op == 5:  # trailing garbage
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    elif op == 6:  # a packet of an unknown length in the middle
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 9, 43, 45, 183, 200])))
        count = struct.unpack_from(">H", b)[0]
        b = bytearray(struct.pack(">H", (count + 1) & 0xFFFF) + struct.pack(">H", len(junk)) + junk + b[2:])
    elif op == 7:
        b = bytearray(rng.choice([b"", b"\x00", b"\x01", b"\x00\x00", b"\x00\x01", b"\xff\xff"]))
    elif op == 8:  # random bytes
        b = bytearray(rng.randbytes(rng.randint(0, 400)))
    elif op == 9:  # random bytes behind a plausible header
        b = bytearray(struct.pack(">HH", rng.randint(1, 4), rng.choice([8, 44, 184, 28, 32]))
                      + rng.randbytes(rng.randint(0, 300)))
    else:  # a zero-length packet
        b = bytearray(encode_message([b""] * rng.randint(1, 3)) + b[2:])
    return bytes(b)


def _corpus(rng: random.Random) -> list[bytes]:
    valid = _valid_messages(rng, N_MESSAGES // 3)
    out = list(valid)
    for _ in range(N_MESSAGES - len(valid)):
        m = rng.choice(valid)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            m = _mutate(rng, m) if m else m
        out.append(m)
    rng.shuffle(out)
    return out


def test_decode_kite_never_crashes(rng):
    corpus = _corpus(rng)
    stats = TwinStats()
    for seq, msg in enumerate(corpus):
        twin = decode_message(msg, seq, seq, stats)
        assert_twin_equal(records(decode_kite(msg, seq, seq)), twin, skip=())
        # Every view type is accepted.
        assert len(decode_kite(memoryview(msg))) == len(twin)
        assert len(decode_kite(bytearray(msg))) == len(twin)
    st = stats.as_dict()
    assert st["messages"] == len(corpus)
    # The corpus really exercised every damage reason.
    for reason in ("empty_message", "heartbeats", "unknown_length", "truncated",
                   "trailing_bytes", "malformed_messages"):
        assert st[reason] > 0, reason


@pytest.mark.parametrize("capacity,depth_capacity", [(1, 1), (3, 1), (16, 2), (64, 64)])
def test_feed_small_buffers(rng, capacity, depth_capacity):
    corpus = _corpus(rng)
    dec = KiteDecoder(capacity, depth_capacity=depth_capacity)
    stats = TwinStats()
    got, want = [], []
    refused = 0
    for seq, msg in enumerate(corpus):
        want.extend(decode_message(msg, seq, seq, stats))
        if not dec.feed(msg, seq, seq):
            refused += 1
            got.extend(decoder_rows(dec))
            dec.clear()
            assert dec.feed(msg, seq, seq)
    got.extend(decoder_rows(dec))
    assert_twin_equal(got, want, skip=("depth_row", "change"))
    st = dec.stats()
    assert st == stats.as_dict()
    assert st["messages"] == len(corpus)
    assert st["bytes"] == sum(map(len, corpus))
    assert st["packets"] == len(want)
    assert st["ltp"] + st["quote"] + st["full"] + st["index_quote"] + st["index_full"] == len(want)
    assert refused > 0
    assert dec.capacity >= capacity  # grown for messages larger than the buffers


def _record(recv_ns: int, kind: int, payload: bytes) -> bytes:
    return struct.pack("<QBI", recv_ns, kind, len(payload)) + payload


@pytest.mark.parametrize("capacity,depth_capacity,text_capacity", [(1, 1, 1), (8, 2, 2),
                                                                    (256, 64, 16)])
def test_feed_capture_small_buffers(rng, capacity, depth_capacity, text_capacity):
    corpus = _corpus(rng)
    parts, kinds = [], []
    for i, msg in enumerate(corpus):
        kind = rng.choices([1, 2, 0, 3, 255], weights=[90, 5, 1, 2, 2])[0]
        kinds.append(kind)
        parts.append(_record(10_000 + i, kind, msg if kind != 2 else b'{"type":"message"}'))
    chunk = b"".join(parts)
    twin_stats = TwinStats()
    want, want_texts, end, end_seq = walk_capture(chunk, 0, 500, twin_stats)
    assert (end, end_seq) == (len(chunk), 500 + len(corpus))

    dec = KiteDecoder(capacity, depth_capacity=depth_capacity, text_capacity=text_capacity)
    got, got_texts = [], []
    pos, seq = 0, 500
    while True:
        pos, seq, full = dec.feed_capture(chunk, pos, seq)
        got.extend(decoder_rows(dec))
        got_texts.extend(tuple(int(x) for x in t) for t in dec.texts[:dec.n_texts].tolist())
        dec.clear()
        if not full:
            break
    assert (pos, seq) == (len(chunk), 500 + len(corpus))
    assert_twin_equal(got, want, skip=("depth_row", "change"))
    assert got_texts == want_texts
    st = dec.stats()
    assert st == twin_stats.as_dict()
    # Every record is accounted for, by kind.
    assert st["messages"] == kinds.count(1)
    assert st["text_messages"] == kinds.count(2)
    assert st["bad_records"] == len(kinds) - kinds.count(1) - kinds.count(2)


def test_feed_capture_partial_records(rng):
    # A chunk cut anywhere stops before the incomplete record, like the twin.
    msgs = _valid_messages(rng, 30)
    chunk = b"".join(_record(i, 1, m) for i, m in enumerate(msgs))
    for cut in sorted(rng.sample(range(len(chunk) + 1), 40)) + [0, 12, 13, len(chunk)]:
        part = chunk[:cut]
        want, _, wpos, wseq = walk_capture(part, 0, 0)
        dec = KiteDecoder(1 << 12)
        pos, seq, full = dec.feed_capture(part, 0, 0)
        assert not full
        assert (pos, seq) == (wpos, wseq)
        assert_twin_equal(decoder_rows(dec), want, skip=("depth_row", "change"))
        # Resuming from ``pos`` with the rest gives the remaining records.
        rest = KiteDecoder(1 << 12)
        pos2, seq2, _ = rest.feed_capture(chunk, pos, seq)
        assert (pos2, seq2) == (len(chunk), len(msgs))
        assert dec.stats()["messages"] + rest.stats()["messages"] == len(msgs)


def test_feed_capture_rejects_bad_pos():
    dec = KiteDecoder(4)
    with pytest.raises(ValueError):
        dec.feed_capture(b"\x00" * 20, 21, 0)
    with pytest.raises(ValueError):
        dec.feed_capture(b"\x00" * 20, -1, 0)
