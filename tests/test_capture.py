"""Capture files: write, read back, chunk, and survive damage.

Round trips through ``CaptureWriter``/``CaptureReader``, sequence numbers
(``first_seq`` continuing across files), ``chunks()`` at tiny chunk sizes
(records split across reads) fed to ``KiteDecoder.feed_capture``, text
records, a truncated last record, and files that are not captures.
"""

from __future__ import annotations

import json
import logging
import struct

import pytest

from ingestor import KiteDecoder
from ingestor.feed.capture import (KIND_BINARY, KIND_TEXT, MAGIC, MAGIC_V1, RECORD_OVERHEAD,
                                   CaptureError, CaptureHeader, CaptureReader, CaptureWriter)
from ingestor.sim.market import HEARTBEAT, Market
from ingestor.twin.frames import TwinStats, decode_message
from kite_compare import assert_twin_equal, decoder_rows

TEXT = b'{"type":"order","data":{"order_id":"1"}}'


def _payloads(rng, n=120):
    market = Market(n_tokens=25, seed=rng.randrange(1 << 31))
    subs = [(int(t), rng.choice(["ltp", "quote", "full"])) for t in market.tokens]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.1:
            out.append((KIND_TEXT, TEXT))
        elif r < 0.2:
            out.append((KIND_BINARY, HEARTBEAT))
        else:
            out.append((KIND_BINARY, market.message(subs, rng.randint(1, 40))))
    return out


def _write(path, payloads, first_seq=0, stream="s-1", version=2):
    with CaptureWriter(path, CaptureHeader(stream=stream, first_seq=first_seq,
                                           extra={"note": "test"}), version=version) as w:
        seqs = [w.write(p, kind, recv_ns=1_700_000_000_000_000_000 + i)
                for i, (kind, p) in enumerate(payloads)]
    return seqs, w


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip(tmp_path, rng, version):
    payloads = _payloads(rng)
    path = tmp_path / "a.cap"
    seqs, w = _write(path, payloads, first_seq=41, version=version)
    assert seqs == list(range(41, 41 + len(payloads)))
    assert w.records == len(payloads) and w.next_seq == 41 + len(payloads)
    assert w.bytes == path.stat().st_size
    with CaptureReader(path) as r:
        assert r.header.broker == "kite" and r.header.stream == "s-1"
        assert r.header.first_seq == 41 and r.header.extra == {"note": "test"}
        recs = list(r.records())
        assert not r.truncated
    assert [(x.kind, x.payload) for x in recs] == payloads
    assert [x.seq for x in recs] == seqs
    assert [x.recv_ns for x in recs] == [1_700_000_000_000_000_000 + i
                                         for i in range(len(payloads))]
    with open(path, "rb") as f:
        assert f.read(8) == (MAGIC if version == 2 else MAGIC_V1)


def test_first_seq_continues_across_files(tmp_path, rng):
    payloads = _payloads(rng, 60)
    seqs1, w1 = _write(tmp_path / "1.cap", payloads[:25], first_seq=0, stream="live")
    seqs2, _ = _write(tmp_path / "2.cap", payloads[25:], first_seq=w1.next_seq, stream="live")
    got = []
    for name in ("1.cap", "2.cap"):
        with CaptureReader(tmp_path / name) as r:
            got.extend(x.seq for x in r.records())
    assert got == seqs1 + seqs2 == list(range(60))


def _decode_chunks(path, chunk_size, capacity):
    dec = KiteDecoder(capacity, depth_capacity=max(1, capacity // 4), text_capacity=2)
    rows, texts = [], []
    with CaptureReader(path, chunk_size=chunk_size) as r:
        for chunk, seq in r.chunks():
            pos = 0
            while True:
                pos, seq, full = dec.feed_capture(chunk, pos, seq)
                rows.extend(decoder_rows(dec))
                for t in dec.texts[:dec.n_texts]:
                    off, n = int(t["offset"]), int(t["length"])
                    texts.append((int(t["seq"]), int(t["recv_ns"]), bytes(chunk[off:off + n])))
                dec.clear()
                if not full:
                    break
            assert pos == len(chunk)
    return rows, texts, dec.stats()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 13, 50, 1000, 1 << 20])
def test_chunks_fed_to_decoder_equal_per_record_feeding(tmp_path, rng, chunk_size, version):
    payloads = _payloads(rng)
    path = tmp_path / "c.cap"
    _write(path, payloads, first_seq=7, version=version)
    # Per record: each binary message fed alone, and the twin.
    want, want_texts = [], []
    stats = TwinStats()
    one = KiteDecoder(16)
    with CaptureReader(path) as r:
        for rec in r.records():
            if rec.kind == KIND_TEXT:
                want_texts.append((rec.seq, rec.recv_ns, rec.payload))
                stats.counts["text_messages"] += 1
                continue
            want.extend(decode_message(rec.payload, rec.recv_ns, rec.seq, stats))
            if not one.feed(rec.payload, rec.recv_ns, rec.seq):
                one.clear()
                assert one.feed(rec.payload, rec.recv_ns, rec.seq)
    rows, texts, st = _decode_chunks(path, chunk_size, capacity=8)
    assert_twin_equal(rows, want, skip=("depth_row", "change"))
    assert texts == want_texts and texts
    assert st == stats.as_dict()
    assert st["messages"] + st["text_messages"] == len(payloads)


def test_chunks_hold_whole_records(tmp_path, rng):
    payloads = _payloads(rng, 40)
    path = tmp_path / "w.cap"
    _write(path, payloads, first_seq=3)
    seen = 0
    with CaptureReader(path, chunk_size=100) as r:
        for chunk, seq in r.chunks():
            assert seq == 3 + seen
            pos = 0
            while pos < len(chunk):
                _, _, n = struct.unpack_from("<QBI", chunk, pos)
                pos += 13 + n
                seen += 1
            assert pos == len(chunk)
    assert seen == len(payloads)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("keep", [1, 8, 12, 13, 14, 28, 29, 30, -1])
def test_truncated_last_record_is_ignored_with_a_warning(tmp_path, rng, caplog, keep, version):
    # ``keep`` bytes of the last record survive: inside its header, at the
    # header's end, inside its payload, or all but the last byte (-1).
    payloads = [(KIND_BINARY, p) for _, p in _payloads(rng, 20) if p != TEXT]
    payloads.append((KIND_BINARY, b"\x00\x01\x00\x08" + bytes(8)))
    path = tmp_path / "t.cap"
    _write(path, payloads, version=version)
    last_len = RECORD_OVERHEAD[version] + len(payloads[-1][1])
    keep = min(keep, last_len - 1) if keep > 0 else last_len - 1
    cut = last_len - keep
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])
    with caplog.at_level(logging.WARNING, logger="ingestor.feed.capture"):
        with CaptureReader(path) as r:
            recs = list(r.records())
            assert r.truncated
            assert r.truncated_bytes == last_len - cut
    assert [x.payload for x in recs] == [p for _, p in payloads[:-1]]
    assert any("truncated" in m for m in caplog.messages)
    # The batch path reads the same whole records.
    caplog.clear()
    rows, _, st = _decode_chunks(path, 64, capacity=32)
    assert st["messages"] == len(payloads) - 1
    assert any("truncated" in m for m in caplog.messages)


def test_untruncated_file_does_not_warn(tmp_path, rng, caplog):
    path = tmp_path / "ok.cap"
    _write(path, _payloads(rng, 10))
    with caplog.at_level(logging.WARNING, logger="ingestor.feed.capture"):
        with CaptureReader(path, chunk_size=9) as r:
            assert len(list(r.records())) == 10
            assert not r.truncated
    assert not caplog.messages


def _raw_file(path, header: bytes, body: bytes = b"", magic: bytes = MAGIC, hlen=None):
    hlen = len(header) if hlen is None else hlen
    path.write_bytes(magic + struct.pack("<I", hlen) + header + body)
    return path


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(b"INGCAP"),
    lambda p: _raw_file(p, b"{}", magic=b"INGCAP03"),
    lambda p: _raw_file(p, b"not json"),
    lambda p: _raw_file(p, b"\xff\xfe"),
    lambda p: _raw_file(p, b"[1, 2]"),
    lambda p: _raw_file(p, json.dumps({"broker": "kite", "stream": "x"}).encode()),
    lambda p: _raw_file(p, json.dumps({"broker": "kite", "stream": "x", "first_seq": -1}).encode()),
    lambda p: _raw_file(p, json.dumps({"broker": "kite", "stream": "x", "first_seq": "0"}).encode()),
    lambda p: _raw_file(p, json.dumps({"broker": "kite", "stream": "x", "first_seq": True}).encode()),
    lambda p: _raw_file(p, b'{"broker":"kite"}', hlen=1000),   # header runs past the end
    lambda p: _raw_file(p, b"", hlen=1 << 30),                   # implausible header length
], ids=["empty", "short", "magic", "not-json", "not-utf8", "not-object", "no-first-seq",
        "negative-seq", "string-seq", "bool-seq", "short-header", "huge-header"])
def test_not_a_capture(tmp_path, make):
    path = tmp_path / "bad.cap"
    make(path)
    with pytest.raises(CaptureError):
        CaptureReader(path)


def test_format_1_record_claiming_a_huge_payload_is_damage(tmp_path):
    """Format 1 cannot resynchronise: the records before the damage are read, the rest is
    counted as damaged (the command line's exit status 3), not refused as a whole."""
    header = CaptureHeader(stream="x").to_json()
    good = struct.pack("<QBI", 1, KIND_BINARY, 1) + b"\x00"
    path = _raw_file(tmp_path / "huge.cap", header,
                     good + struct.pack("<QBI", 1, KIND_BINARY, 0xFFFFFFFF) + b"\x00" * 50,
                     magic=MAGIC_V1)
    with CaptureReader(path) as r:
        assert [x.payload for x in r.records()] == [b"\x00"]
        assert r.damage_found and r.damaged_bytes == 13 + 50


def test_unknown_record_kind_is_counted(tmp_path, rng):
    payloads = _payloads(rng, 30)
    body = bytearray()
    kinds = []
    for i, (kind, p) in enumerate(payloads):
        if i % 7 == 3:
            kind = (0, 3, 200)[i % 3]  # not a kind the format defines
        kinds.append(kind)
        body += struct.pack("<QBI", i, kind, len(p)) + p
    path = _raw_file(tmp_path / "k.cap", CaptureHeader(stream="k").to_json(), bytes(body),
                     magic=MAGIC_V1)
    with CaptureReader(path) as r:
        assert [x.kind for x in r.records()] == kinds
    with pytest.raises(ValueError):
        with CaptureWriter(tmp_path / "w.cap") as w:
            w.write(b"x", kind=3)
    _, _, st = _decode_chunks(path, 33, capacity=4)
    bad = sum(k not in (1, 2) for k in kinds)
    assert bad > 0
    assert st["bad_records"] == bad
    assert st["messages"] == kinds.count(1)
    assert st["text_messages"] == kinds.count(2)


HOSTILE_HEADERS = [
    ("first_seq 2^63-1", {"broker": "kite", "stream": "s", "first_seq": (1 << 63) - 1}),
    ("first_seq 2^63", {"broker": "kite", "stream": "s", "first_seq": 1 << 63}),
    ("stream with NUL", {"broker": "kite", "stream": "a\x00b", "first_seq": 0}),
    ("stream as a path", {"broker": "kite", "stream": "../../../x", "first_seq": 0}),
    ("stream 20 KB", {"broker": "kite", "stream": "s" * 20_000, "first_seq": 0}),
    ("stream not a string", {"broker": "kite", "stream": 5, "first_seq": 0}),
]


@pytest.mark.parametrize("what,header", HOSTILE_HEADERS, ids=[h[0] for h in HOSTILE_HEADERS])
def test_hostile_capture_header_is_one_line_exit_2(tmp_path, what, header):
    """A header that would wrap the sequence negative, build paths out of the dead-letter folder
    or reach the database with a NUL is refused before anything is read or written."""
    import json
    import subprocess
    import sys

    raw = json.dumps(header).encode()
    path = tmp_path / "h.cap"
    path.write_bytes(b"INGCAP01" + len(raw).to_bytes(4, "little") + raw)
    for args in (["decode", str(path)], ["replay", str(path), "--dsn", "host=127.0.0.1 port=1"]):
        r = subprocess.run([sys.executable, "-m", "ingestor", *args], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_deeply_nested_capture_header_is_refused(tmp_path):
    import subprocess
    import sys

    raw = b"[" * 200_000 + b"]" * 200_000
    path = tmp_path / "deep.cap"
    path.write_bytes(b"INGCAP01" + len(raw).to_bytes(4, "little") + raw)
    r = subprocess.run([sys.executable, "-m", "ingestor", "decode", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "nested too deeply" in r.stderr or "not" in r.stderr
