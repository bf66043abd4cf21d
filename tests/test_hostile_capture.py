"""Damaged capture and spool records: skipped and counted, never the rest of the file.

Issue item 10: one record's length set to 0xFFFFFF made ``decode`` and ``replay`` skip
99,419 of 100,000 ticks with exit status 0, and the daemon's leftover replay then deleted the
spool file.  Format 2 frames every record (marker, sequence number, CRC-32): the reader finds
the next intact record, the sequence numbers say which records were lost, the exit status is
3, and a spool segment with damage is moved aside, never deleted.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import psycopg
import pytest

from daemon_harness import Daemon, count_ticks, free_port, healthz, wait_for
from ingestor.feed.capture import KIND_BINARY, CaptureHeader, CaptureReader, CaptureWriter
from ingestor.feed.spool import DAMAGED_DIR, Spool
from test_hostile_feed import TOKEN, HostileServer, metric

PACKETS = 50
T0 = 1_700_000_000_000_000_000


def _ltp_packets(token: int, price: int, n: int) -> bytes:
    return struct.pack(">H", n) + b"".join(struct.pack(">HII", 8, token, price + i)
                                           for i in range(n))


def _write_capture(path, messages: int, *, stream="damaged", first_seq=0, version=2,
                   token=TOKEN, t0=T0) -> list[int]:
    """``messages`` messages of PACKETS LTP packets; returns each record's file offset."""
    offsets = []
    with CaptureWriter(path, CaptureHeader(stream=stream, first_seq=first_seq),
                       version=version) as w:
        for i in range(messages):
            offsets.append(w.bytes)
            w.write(_ltp_packets(token, 10_000 + i * PACKETS, PACKETS), KIND_BINARY,
                    t0 + i * 1_000_000)
    return offsets


def _set_length(path, offset: int, version: int, length: int = 0xFFFFFF) -> None:
    """Overwrite the payload length of the record at ``offset``."""
    at = offset + (21 if version == 2 else 9)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(length.to_bytes(4, "little"))


def _ingestor(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingestor", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_damaged_length_costs_one_record_in_decode(tmp_path):
    """2,000 messages (100,000 ticks), record 10's length 0xFFFFFF: 99,950 ticks decoded, the
    damage in the summary, exit status 3."""
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 2_000)
    _set_length(path, offsets[10], 2)
    r = _ingestor("decode", str(path), "--summary-json")
    assert r.returncode == 3, r.stderr
    s = json.loads(r.stdout)
    assert s["ticks"] == 2_000 * PACKETS - PACKETS
    assert s["damaged"]["stretches"] == 1 and s["damaged"]["records_lost"] == 1
    assert "damaged" in r.stderr
    # every sequence number but the damaged record's, in order
    with CaptureReader(path) as rd:
        assert [x.seq for x in rd.records()] == [k for k in range(2_000) if k != 10]


@pytest.mark.parametrize("where", ["marker", "crc", "payload", "short-length"])
def test_other_damage_costs_one_record(tmp_path, where):
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 50)
    at = {"marker": offsets[7], "crc": offsets[7] + 26, "payload": offsets[7] + 40,
          "short-length": offsets[7] + 21}[where]
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    for chunk_size in (37, 1 << 20):
        with CaptureReader(path, chunk_size=chunk_size) as rd:
            assert [x.seq for x in rd.records()] == [k for k in range(50) if k != 7]
            assert rd.damaged == 1 and rd.lost_records == 1


def test_damaged_last_records_are_damage_not_a_truncated_tail(tmp_path):
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 20)
    data = bytearray(path.read_bytes())
    data[offsets[18] + 30] ^= 0xFF  # the second-to-last record's payload
    path.write_bytes(bytes(data))
    with CaptureReader(path) as rd:
        assert [x.seq for x in rd.records()] == [k for k in range(20) if k != 18]
        assert rd.damage_found and not rd.truncated


def test_format_1_damage_is_reported_with_exit_3(tmp_path):
    """The older format cannot resynchronise: what precedes the damage is decoded, and the
    exit status says the rest was not (it said 0 with a warning)."""
    path = tmp_path / "v1.cap"
    offsets = _write_capture(path, 100, version=1)
    _set_length(path, offsets[10], 1, 0xFFFFFFF0)
    r = _ingestor("decode", str(path), "--summary-json")
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout)["ticks"] == 10 * PACKETS


def test_replay_writes_every_intact_record_and_exits_3(tmp_path, db):
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 400)
    _set_length(path, offsets[10], 2)
    r = _ingestor("replay", str(path), "--dsn", db, "--no-progress")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "damaged: 1 stretch(es)" in r.stdout
    assert count_ticks(db) == 399 * PACKETS
    # replayed again: exactly once, still exit 3 (the file is still damaged)
    r = _ingestor("replay", str(path), "--dsn", db, "--no-progress")
    assert r.returncode == 3, r.stderr
    assert count_ticks(db) == 399 * PACKETS


def test_spool_reads_past_damage_and_keeps_the_file(tmp_path):
    """The spool's reader (a leftover read back): the records after the damage are taken, in
    order, with their own sequence numbers; the segment is moved aside once released."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    seg = spool_dir / f"left.{0:012d}.cap"
    offsets = _write_capture(seg, 300, stream="left")
    _set_length(seg, offsets[10], 2)
    sp = Spool(str(spool_dir), max_bytes=1 << 30, segment_bytes=1 << 20)
    (left,) = sp.leftovers()
    seqs = []
    while (got := left.take(limit=4096)) is not None:
        chunk, first = got
        n = 0
        pos = 0
        while pos < len(chunk):
            pos += 13 + struct.unpack_from("<QBI", chunk, pos)[2]
            n += 1
        seqs.extend(range(first, first + n))
    assert seqs == [k for k in range(300) if k != 10]
    assert left.consumed
    assert sp.damaged == 1 and sp.lost_records == 1
    left.release(299)
    left._write_out()
    assert not seg.exists()
    assert (spool_dir / DAMAGED_DIR / seg.name).exists()  # kept, not deleted
    assert sp.leftover_files() == []                       # and not replayed again
    sp.close()


def test_spool_skip_to_lands_exactly_past_damage(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    seg = spool_dir / f"left.{0:012d}.cap"
    offsets = _write_capture(seg, 100, stream="left")
    _set_length(seg, offsets[10], 2)
    for start in (5, 10, 11, 12, 60):
        sp = Spool(str(spool_dir), max_bytes=1 << 30)
        (left,) = sp.leftovers()
        left.skip_to(start)
        chunk, first = left.take()
        assert first == (11 if start == 10 else start)
        # the damaged record 10 is counted lost when the reading starts at it
        assert sp.lost_records == (1 if start == 10 else 0)
        sp.close()


def test_daemon_leftover_with_damage_is_replayed_past_it_and_kept(tmp_path, db):
    """A spool segment an earlier run left, one record's length damaged: the daemon replays
    every intact record (it stopped at the damage and then deleted the file), moves the file
    to ``damaged/``, counts it in a metric and in /healthz, stops with 0, and restarts
    cleanly without replaying it again."""
    other = 256265
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    seg = spool_dir / f"kite-0-old.{0:012d}.cap"
    offsets = _write_capture(seg, 200, stream="kite-0-old", token=other,
                             t0=time.time_ns() - 3_600_000_000_000)
    _set_length(seg, offsets[10], 2)
    port = free_port()
    srv = HostileServer(b"", bad_connections=0)
    try:
        d = Daemon(tmp_path, db, srv.url, feed=f"tokens = [{TOKEN}]\n", metrics_port=port)

        def leftover_ticks():
            with psycopg.connect(db) as c:
                return c.execute("select count(*) from tick_data t join instruments i on "
                                 "i.id = t.instrument_id where i.instrument_token = %s",
                                 (other,)).fetchone()[0]

        wait_for(lambda: leftover_ticks() == 199 * PACKETS, timeout=60, what="leftover ticks")
        wait_for(lambda: (spool_dir / DAMAGED_DIR / seg.name).exists(), timeout=30,
                 what="the damaged segment moved aside")
        assert metric(port, "ingestor_spool_damaged_total") == 1
        assert metric(port, "ingestor_spool_lost_records_total") == 1
        status, health = healthz(port)
        assert status == 503 and health["spool_damaged"]["stretches"] == 1
        wait_for(lambda: count_ticks(db) > 199 * PACKETS + 5, timeout=60, what="live ticks")
        srv.finish()
        assert d.terminate() == 0, d.output()
        assert d.proc.poll() == 0
    finally:
        srv.close()
    assert leftover_ticks() == 199 * PACKETS
    assert not seg.exists()
    # a restart over the same spool starts cleanly and does not replay the damaged file
    srv = HostileServer(b"", bad_connections=0)
    try:
        d = Daemon(tmp_path, db, srv.url, feed=f"tokens = [{TOKEN}]\n", metrics_port=port,
                   name="again")
        before = count_ticks(db)
        wait_for(lambda: count_ticks(db) > before + 5, timeout=60, what="live ticks again")
        status, health = healthz(port)
        assert health["spool_damaged"]["stretches"] == 0
        srv.finish()
        assert d.terminate() == 0, d.output()
    finally:
        srv.close()
    assert leftover_ticks() == 199 * PACKETS
    with psycopg.connect(db) as c:
        n, distinct = c.execute("select count(*), count(distinct (instrument_id, time)) "
                                "from tick_data").fetchone()
    assert n == distinct
    assert (spool_dir / DAMAGED_DIR / seg.name).exists()
