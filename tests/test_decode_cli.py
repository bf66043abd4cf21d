"""``ingestor decode``: summaries, client-identical JSON ticks, exit statuses."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from conftest import VECTORS
from ingestor.feed.capture import KIND_BINARY, KIND_TEXT, CaptureHeader, CaptureWriter


def _vector_messages() -> list[bytes]:
    msgs = [open(os.path.join(VECTORS, f), "rb").read()
            for f in ("fullMode_binary.packet", "quoteMode_binary.packet", "ltpMode_binary.packet")]
    for f in ("ticker_full.packet", "ticker_quote.packet"):
        pkt = base64.b64decode(open(os.path.join(VECTORS, f)).read())
        msgs.append(b"\x00\x01" + len(pkt).to_bytes(2, "big") + pkt)
    return msgs


def _client_ticks(msg: bytes) -> list[dict]:
    """The official client's ticks, datetimes turned back into epoch seconds."""
    from kiteconnect import KiteTicker

    ticks = KiteTicker._parse_binary(KiteTicker.__new__(KiteTicker), msg)
    for t in ticks:
        for k, v in t.items():
            if isinstance(v, dt.datetime):
                t[k] = int(v.timestamp())  # naive local time, as fromtimestamp made it
    return ticks


def _ingestor(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingestor", *args], capture_output=True,
                          text=True, timeout=120, **kw)


@pytest.fixture
def vector_capture(tmp_path):
    path = tmp_path / "vectors.cap"
    with CaptureWriter(path, CaptureHeader(stream="vectors", first_seq=10)) as w:
        for i, m in enumerate(_vector_messages()):
            w.write(m, KIND_BINARY, 1_700_000_000_000_000_000 + i)
        w.write(b"\x00", KIND_BINARY, 1)                        # heartbeat
        w.write(b'{"type":"message","data":"hi"}', KIND_TEXT, 2)
        w.write(b"\x00\x02\x00\x08" + bytes(8), KIND_BINARY, 3)  # 2nd packet missing
    return path


def test_jsonl_equals_official_client(vector_capture):
    r = _ingestor("decode", str(vector_capture), "--jsonl")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    want = [t for m in _vector_messages() for t in _client_ticks(m)]
    want.append(_client_ticks(b"\x00\x01\x00\x08" + bytes(8))[0])  # the truncated message's kept packet
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        recv_ns = g.pop("recv_ns")
        assert recv_ns > 0 or g["instrument_token"] == 0
        assert list(g) == list(w)          # same keys, same order
        assert g == w                      # same values (floats bit for bit via JSON repr)


def test_summary_counts(vector_capture):
    r = _ingestor("decode", str(vector_capture), "--summary-json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["stream"] == "vectors"
    assert s["messages"] == {"binary": 6, "heartbeat": 1, "text": 1}
    assert s["ticks"] == 6
    assert s["modes"] == {"ltp": 2, "quote": 2, "full": 2, "index_quote": 0, "index_full": 0}
    assert s["malformed_messages"] == 1 and s["errors"]["truncated"] == 1


def test_truncated_capture_is_not_an_error(vector_capture):
    data = vector_capture.read_bytes()
    vector_capture.write_bytes(data[:-5])   # cut inside the last record
    r = _ingestor("decode", str(vector_capture), "--summary-json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["truncated_record_bytes"] > 0
    assert s["messages"]["binary"] == 5
    assert "truncated" in r.stderr


@pytest.mark.parametrize("content, why", [
    (None, "no such file"),
    (b"not a capture at all", "not a capture file"),
    (b"INGCAP01" + (5).to_bytes(4, "little") + b"{bad}", "not UTF-8 JSON"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, content, why):
    path = tmp_path / "bad.cap"
    if content is not None:
        path.write_bytes(content)
    r = _ingestor("decode", str(path))
    assert r.returncode == 2
    assert why in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_usage_error_exits_2():
    r = _ingestor("decode")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_bench_decode_quick_runs():
    r = _ingestor("bench", "--only", "decode", "--quick")
    assert r.returncode == 0, r.stderr
    assert "batch pkt/s" in r.stdout and "kiteconnect" in r.stdout
