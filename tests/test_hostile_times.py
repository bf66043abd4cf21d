"""Receive times outside a plausible window are refused per record, never pinning a time.

Issue item 9: one capture record with receive time 0x7fff_ffff_ffff_ffff pinned every later
tick of its instrument to 2262-04-11 plus n microseconds, across restarts.  The driver gives
the decoder a window (2000-01-01 .. now + 1 day); a binary record outside it is skipped and
counted in ``bad_time`` (``ingestor_malformed_messages_total{reason="bad_time"}``), its
sequence number passing as usual.  (Backfills keeping their own times across days is the
storage side's, not tested here.)
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import psycopg

from ingestor import KiteDecoder
from ingestor.feed.capture import KIND_BINARY, CaptureHeader, CaptureReader, CaptureWriter
from ingestor.pipeline.driver import MAX_AHEAD_NS, MIN_RECV_NS
from test_hostile_feed import TOKEN, ltp_message

T0 = 1_700_000_000_000_000_000  # 2023-11-14
HOSTILE_TIMES = [0x7FFF_FFFF_FFFF_FFFF, 5, MIN_RECV_NS - 1, -1]


def _capture(path, stream: str, t0: int, bad=()) -> list[int]:
    """Valid LTP ticks 1 ms apart with the ``bad`` receive times between them; returns the
    valid ticks' receive times."""
    good = []
    with CaptureWriter(path, CaptureHeader(stream=stream, first_seq=0)) as w:
        for i in range(6):
            w.write(ltp_message(TOKEN, 10_000 + i), KIND_BINARY, t0 + i * 1_000_000)
            good.append(t0 + i * 1_000_000)
            if i < len(bad):
                w.write(ltp_message(TOKEN, 20_000 + i), KIND_BINARY, bad[i] & ((1 << 64) - 1))
    return good


def test_decoder_window_refuses_and_counts_keeping_places(tmp_path):
    path = tmp_path / "t.cap"
    _capture(path, "w", T0, HOSTILE_TIMES)
    dec = KiteDecoder(64)
    dec.min_recv_ns = MIN_RECV_NS
    dec.max_recv_ns = T0 + MAX_AHEAD_NS
    with CaptureReader(path) as rd:
        (chunk, seq), = rd.chunks()
        pos, nxt, full = dec.feed_capture(chunk, 0, seq)
    assert not full and nxt == 6 + len(HOSTILE_TIMES)
    assert dec.stats()["bad_time"] == len(HOSTILE_TIMES)
    ticks = dec.ticks[:dec.n_ticks]
    assert len(ticks) == 6 and set(ticks["last_price"]) == set(range(10_000, 10_006))
    # the places pass: the valid records keep their own sequence numbers
    assert list(ticks["seq"]) == [0, 2, 4, 6, 8, 9]
    # open by default (ingestor decode shows what the file holds)
    plain = KiteDecoder(64)
    plain.feed_capture(chunk, 0, seq)
    assert plain.stats()["bad_time"] == 0 and plain.n_ticks == 6 + len(HOSTILE_TIMES)


def test_replay_refuses_implausible_receive_times_and_does_not_pin_the_instrument(tmp_path, db):
    first = tmp_path / "a.cap"
    good_a = _capture(first, "times-a", T0, HOSTILE_TIMES)
    r = subprocess.run([sys.executable, "-m", "ingestor", "replay", str(first), "--dsn", db,
                        "--no-progress"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"{len(HOSTILE_TIMES)} record(s) with a receive time outside" in r.stdout, r.stdout
    # a later capture of the same instrument: its ticks keep their own times (they were
    # pinned to 2262-04-11 + n us, across restarts, by the engine state)
    later = tmp_path / "b.cap"
    good_b = _capture(later, "times-b", T0 + 60 * 10**9)
    r = subprocess.run([sys.executable, "-m", "ingestor", "replay", str(later), "--dsn", db,
                        "--no-progress"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    with psycopg.connect(db) as c:
        times = [t for (t,) in c.execute("SELECT time FROM tick_data ORDER BY time")]
        prices = [p for (p,) in c.execute("SELECT price FROM tick_data ORDER BY time")]
    want = [dt.datetime.fromtimestamp(ns // 1000 / 1e6, dt.timezone.utc) for ns in good_a + good_b]
    assert times == want
    assert all(p < 200 for p in prices)  # none of the refused records' prices (200.00+)
