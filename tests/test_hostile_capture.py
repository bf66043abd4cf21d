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


def test_decode_names_each_damaged_stretch_by_file_offset_and_seqs(tmp_path):
    """Two damaged records: the summary names the file, each stretch's byte offset (where the
    intact records stop) and the sequence numbers lost there; the JSON summary lists them."""
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 100, first_seq=500)
    _set_length(path, offsets[10], 2)
    data = bytearray(path.read_bytes())
    data[offsets[40] + 40] ^= 0x01  # record 40's payload: its CRC fails
    path.write_bytes(bytes(data))
    r = _ingestor("decode", str(path))
    assert r.returncode == 3, r.stderr
    assert f"{path}: damaged stretch at byte offset {offsets[10]} " in r.stdout
    assert "record seq 510 lost" in r.stdout
    assert f"{path}: damaged stretch at byte offset {offsets[40]} " in r.stdout
    assert "record seq 540 lost" in r.stdout
    assert f"first at byte offset {offsets[10]}" in r.stderr
    r = _ingestor("decode", str(path), "--summary-json")
    s = json.loads(r.stdout)
    assert [(d["offset"], d["bytes"], d["first_lost_seq"], d["records_lost"])
            for d in s["damaged"]["at"]] == [
        (offsets[10], offsets[11] - offsets[10], 510, 1),
        (offsets[40], offsets[41] - offsets[40], 540, 1)]
    assert s["stopped_at_damage"] is None and s["ticks"] == 98 * PACKETS
    # the reader, for any chunking: the same stretches
    for chunk_size in (37, 1 << 20):
        with CaptureReader(path, chunk_size=chunk_size) as rd:
            list(rd.chunks())
            assert [(d.start, d.end, d.first_lost, d.lost) for d in rd.damage] == [
                (offsets[10], offsets[11], 510, 1), (offsets[40], offsets[41], 540, 1)]


def test_damage_running_to_the_end_of_the_file_is_named(tmp_path):
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 20)
    with open(path, "ab") as f:
        f.write(b"\x00\x13garbage" * 50)  # after the last record: not a record at all
    data = bytearray(path.read_bytes())
    data[offsets[19] + 30] ^= 0xFF
    path.write_bytes(bytes(data))
    with CaptureReader(path) as rd:
        assert [x.seq for x in rd.records()] == list(range(19))
        [d] = rd.damage
        assert (d.start, d.end, d.first_lost, d.lost) == (offsets[19], path.stat().st_size, 19,
                                                           None)


def test_decode_until_damage_stops_at_the_first_stretch(tmp_path):
    """--until-damage: the records before the first damage are decoded, none after; the
    summary says where it stopped and the bytes left; exit status 3."""
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 100)
    _set_length(path, offsets[30], 2)
    _set_length(path, offsets[60], 2)
    r = _ingestor("decode", str(path), "--until-damage", "--summary-json")
    assert r.returncode == 3, r.stderr
    s = json.loads(r.stdout)
    assert s["ticks"] == 30 * PACKETS
    stop = s["stopped_at_damage"]
    assert stop["offset"] == offsets[30] and stop["first_lost_seq"] == 30
    assert stop["bytes_left"] == path.stat().st_size - offsets[30]
    assert s["damaged"]["stretches"] == 1 and s["damaged"]["records_lost"] == 1
    r = _ingestor("decode", str(path), "--until-damage")
    assert r.returncode == 3
    assert f"stopped at the first damage (--until-damage): {path}: damaged stretch at byte " \
           f"offset {offsets[30]}" in r.stdout
    # without the option: both stretches skipped, the rest decoded
    s = json.loads(_ingestor("decode", str(path), "--summary-json").stdout)
    assert s["ticks"] == 98 * PACKETS and len(s["damaged"]["at"]) == 2


def test_replay_until_damage_commits_what_precedes_it_then_resumes(tmp_path, db):
    """replay --until-damage commits every record before the first damage and names where it
    stopped (exit 3); a replay without the option then goes on past it, exactly once."""
    path = tmp_path / "d.cap"
    offsets = _write_capture(path, 200)
    _set_length(path, offsets[50], 2)
    r = _ingestor("replay", str(path), "--dsn", db, "--no-progress", "--until-damage")
    assert r.returncode == 3, r.stdout + r.stderr
    assert count_ticks(db) == 50 * PACKETS
    assert f"damaged stretch at byte offset {offsets[50]}" in r.stdout
    assert "stopped at the first damage" in r.stdout
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT committed_seq FROM stream_offsets WHERE stream = 'damaged'"
                            ).fetchone()[0] == 49
    r = _ingestor("replay", str(path), "--dsn", db, "--no-progress")
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"damaged stretch at byte offset {offsets[50]}" in r.stdout
    assert count_ticks(db) == 199 * PACKETS


def test_many_damaged_stretches_are_listed_up_to_a_bound_and_all_counted(tmp_path):
    """A file damaged everywhere: the first MAX_LISTED_DAMAGE stretches are named, the rest
    counted (memory and log lines stay bounded), and the counters hold every one."""
    from ingestor.feed.capture import MAX_LISTED_DAMAGE

    path = tmp_path / "d.cap"
    n = 2 * MAX_LISTED_DAMAGE + 50
    offsets = _write_capture(path, 2 * n + 1)
    data = bytearray(path.read_bytes())
    for k in range(1, 2 * n, 2):  # every other record's payload (the last one intact)
        data[offsets[k] + 40] ^= 0x01
    path.write_bytes(bytes(data))
    with CaptureReader(path) as rd:
        assert [x.seq for x in rd.records()] == list(range(0, 2 * n + 1, 2))
        assert rd.damaged == n and rd.lost_records == n
        assert len(rd.damage) == MAX_LISTED_DAMAGE and rd.unlisted_damage == n - MAX_LISTED_DAMAGE
        assert [d.first_lost for d in rd.damage] == list(range(1, 2 * MAX_LISTED_DAMAGE, 2))
    r = _ingestor("decode", str(path), "--summary-json")
    s = json.loads(r.stdout)
    assert len(s["damaged"]["at"]) == MAX_LISTED_DAMAGE
    assert s["damaged"]["not_listed"] == n - MAX_LISTED_DAMAGE
    assert r.stderr.count("damaged stretch at byte offset") == MAX_LISTED_DAMAGE
