"""The official Kite Connect client as the oracle, on large simulated captures.

Captures from ``ingestor.sim.market`` (every segment, every mode, mixed modes
changing mid-stream) are decoded by ``decode_kite``, by the batch path
(``KiteDecoder.feed_capture``) and by ``KiteTicker._parse_binary``
(kiteconnect 5.2.2); every field the client produces must equal ours.
"""

from __future__ import annotations

import pytest

from ingestor import KiteDecoder, decode_kite
from ingestor.feed.capture import CaptureReader
from ingestor.sim.market import Market, generate_capture
from ingestor.twin.frames import decode_message
from kite_compare import (assert_client_equal, assert_twin_equal, client_parse, decoder_rows,
                          records)

TICKS = 50_000


@pytest.mark.parametrize("mode", ["ltp", "quote", "full", "mixed"])
def test_client_agrees_on_simulated_capture(tmp_path, rng, mode):
    seed = rng.randrange(1 << 31)
    path = tmp_path / f"{mode}.cap"
    summary = generate_capture(path, TICKS, tokens=60, mode=mode, seed=seed)
    assert summary["packets"] == TICKS
    seen_segments, seen_lengths, seen_modes = set(), set(), set()
    n_packets = n_messages = 0
    with CaptureReader(path) as reader:
        for rec in reader.records():
            assert rec.kind == 1
            n_messages += 1
            ours = records(decode_kite(rec.payload, rec.recv_ns, rec.seq))
            client = client_parse(rec.payload)
            assert len(ours) == len(client)
            for o, c in zip(ours, client):
                assert o["recv_ns"] == rec.recv_ns and o["seq"] == rec.seq
                assert_client_equal(o, c)
                seen_segments.add(o["segment"])
                seen_lengths.add(o["length"])
                seen_modes.add((o["segment"], o["mode"]))
            n_packets += len(ours)
    assert n_packets == TICKS
    assert n_messages == summary["messages"]
    # 60 instruments cover every segment of the model.
    assert seen_segments == {1, 2, 3, 4, 5, 6, 7, 8, 9, 12}
    # every segment in every mode of the capture (mixed captures cover all, for every seed)
    modes = {1, 2, 3} if mode == "mixed" else {{"ltp": 1, "quote": 2, "full": 3}[mode]}
    assert seen_modes == {(s, m) for s in seen_segments for m in modes}
    assert seen_lengths == {"ltp": {8}, "quote": {28, 44}, "full": {32, 184},
                            "mixed": {8, 28, 32, 44, 184}}[mode]


def test_batch_path_equals_per_message_decoding(tmp_path, rng):
    # The capture's records through feed_capture (small buffers, so it stops
    # for room many times) give what decode_kite and the twin give per record.
    seed = rng.randrange(1 << 31)
    path = tmp_path / "mixed.cap"
    generate_capture(path, 20_000, tokens=40, mode="mixed", seed=seed)
    expected = []
    with CaptureReader(path) as reader:
        for rec in reader.records():
            recs = records(decode_kite(rec.payload, rec.recv_ns, rec.seq))
            assert_twin_equal(recs, decode_message(rec.payload, rec.recv_ns, rec.seq), skip=())
            expected.extend(recs)
    got = []
    dec = KiteDecoder(777, depth_capacity=100)
    with CaptureReader(path, chunk_size=1 << 16) as reader:
        for chunk, seq in reader.chunks():
            pos = 0
            while True:
                pos, seq, full = dec.feed_capture(chunk, pos, seq)
                got.extend(decoder_rows(dec))
                dec.clear()
                if not full:
                    break
            assert pos == len(chunk)
    assert_twin_equal(got, expected, skip=("depth_row", "change"))
    st = dec.stats()
    assert st["packets"] == len(expected) == 20_000
    assert st["malformed_messages"] == 0


def test_market_message_for_subscriptions():
    market = Market(n_tokens=30, seed=5)
    subs = {int(t): m for t, m in zip(market.tokens, ["ltp", "quote", "full"] * 10)}
    subs[123456789] = "full"  # not in the universe: nothing is sent for it
    for n in (None, 1, 30, 100):
        msg = market.message(subs, n)
        ours = records(decode_kite(msg))
        assert len(ours) == (30 if n is None else n)
        for o, c in zip(ours, client_parse(msg)):
            assert_client_equal(o, c)
            inst = market.instrument(o["instrument_token"])
            mode = subs[o["instrument_token"]]
            assert o["mode"] == {"ltp": 1, "quote": 2, "full": 3}[mode]
            assert o["length"] == ({"ltp": 8, "quote": 28, "full": 32} if inst.is_index
                                   else {"ltp": 8, "quote": 44, "full": 184})[mode]
        if n is not None and n <= 30:
            tokens = [o["instrument_token"] for o in ours]
            assert len(set(tokens)) == len(tokens)
    assert market.message({}, 5) == b"\x00"
