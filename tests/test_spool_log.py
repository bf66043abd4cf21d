"""The spool under the log (``--role feed``).  It keeps, beside each segment, where the
log's messages of it ended (``StreamSpool.mark``, ``<segment>.batches``): a restarted feed
reads them back with the leftover (``batch_ends``) to publish it in the same messages,
whose ids JetStream's duplicate window knows.  They go with their segment, a torn or
hostile file only costs message boundaries, and one whose segment is gone is removed.
Records released before the spool's thread came to them (the log acknowledged them within
its write delay) are not written, unless recording."""

from __future__ import annotations

import os
import time

from ingestor.feed.capture import KIND_BINARY
from ingestor.feed.spool import BATCHES_SUFFIX, Spool, StreamSpool


def _until(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _written(sp) -> bool:
    # (the spool's writer thread has written out every record; the marks that came with
    # them are written after them in the same step, before the next)
    with sp._lock:
        return not sp._pending and not sp._marks and not sp._in_flight


def _spool_with_marks(folder: str, n: int, ends: list[int], segment_bytes: int = 1 << 20):
    spool = Spool(folder, max_bytes=1 << 30, segment_bytes=segment_bytes)
    sp = spool.stream("kite-0-00000000abcd")
    for k in range(n):
        sp.append(b"x" * 200, KIND_BINARY, 1_000 + k)
        if k in ends:
            sp.mark(k)
        if k % 1000 == 999:  # written out in steps: the segments rotate between them
            _until(lambda: _written(sp), "the spool's writer thread")
    _until(lambda: _written(sp), "the spool's writer thread")
    return spool, sp


def test_batch_ends_kept_beside_the_segment_and_read_back_with_the_leftover(tmp_path):
    folder = str(tmp_path / "spool")
    ends = [9, 30, 31, 99]
    spool, sp = _spool_with_marks(folder, 100, ends)
    seg = sp.segments[-1].path
    _until(lambda: os.path.exists(seg + BATCHES_SUFFIX), "the marks written")
    spool.close()  # a stop (or a kill: the thread wrote them as it wrote the records)

    again = Spool(folder, max_bytes=1 << 30)
    (left,) = again.leftovers()
    assert left.batch_ends == frozenset(ends) and left.batch_end_max == 99
    # the republish marks its messages too (the same ends: a second restart reproduces them)
    again.start()  # (the writer thread: a feed's live streams start it)
    left.mark(9)
    kept = tmp_path / "spool" / (os.path.basename(seg) + BATCHES_SUFFIX)
    _until(lambda: kept.stat().st_size == 8 * (len(ends) + 1), "the mark written")
    again.close()


def test_batch_ends_go_with_their_segment(tmp_path):
    folder = str(tmp_path / "spool")
    # segments of 1 MiB, records of 213 bytes: several segments
    spool, sp = _spool_with_marks(folder, 12_000, set(range(99, 12_000, 100)))
    paths = [s.path for s in sp.segments]
    assert len(paths) > 1
    _until(lambda: all(os.path.exists(p + BATCHES_SUFFIX) for p in paths[1:]),
           "each segment's marks written")
    while sp.take() is not None:
        pass
    sp.release(sp.segments[1].end_seq - 1)  # the first two segments committed
    # (the thread deletes a segment, then its marks: wait for both, not for the first)
    _until(lambda: sum(not os.path.exists(p) and not os.path.exists(p + BATCHES_SUFFIX)
                       for p in paths) >= 2, "two segments deleted with their marks")
    gone = [p for p in paths if not os.path.exists(p)]
    assert len(gone) == 2
    assert not any(os.path.exists(p + BATCHES_SUFFIX) for p in gone)
    assert os.path.exists(paths[-1] + BATCHES_SUFFIX)
    spool.close()


def test_torn_hostile_or_orphaned_batch_ends(tmp_path):
    folder = str(tmp_path / "spool")
    spool, sp = _spool_with_marks(folder, 50, [19, 49])
    seg = sp.segments[-1].path
    spool.close()
    with open(seg + BATCHES_SUFFIX, "ab") as f:
        f.write(b"\xff\xff\xff")  # torn: a kill in the middle of a write
    orphan = os.path.join(folder, "kite-0-000000000000.000000000000.cap" + BATCHES_SUFFIX)
    with open(orphan, "wb") as f:
        f.write(os.urandom(40))  # its segment is gone
    again = Spool(folder, max_bytes=1 << 30)
    (left,) = again.leftovers()
    assert left.batch_ends == {19, 49}
    assert not os.path.exists(orphan)
    again.close()

    with open(seg + BATCHES_SUFFIX, "wb") as f:
        f.write(os.urandom(64))  # any value: it only chooses where messages end
    third = Spool(folder, max_bytes=1 << 30)
    (left,) = third.leftovers()
    assert len(left.batch_ends) <= 8
    third.close()


def _unthreaded(spool):
    """A stream of ``spool`` whose writes the test makes (``_write_out``: the writer
    thread's step), in its own order."""
    sp = StreamSpool(spool, "kite-0-00000000abcd")
    spool.streams.append(sp)
    return sp


def test_records_released_before_the_write_are_not_written(tmp_path):
    folder = str(tmp_path / "spool")
    spool = Spool(folder, max_bytes=1 << 30)
    sp = _unthreaded(spool)
    for k in range(100):
        sp.append(b"x" * 200, KIND_BINARY, 1_000 + k)
    assert spool.bytes > 0
    assert sp.take()[1] == 0
    sp.release(99)  # the log acknowledged all of them
    sp._write_out()  # (what the writer thread does next)
    assert spool.leftover_files() == []  # nothing written: nothing to lose
    assert spool.bytes == 0              # and the spool's size bound counts nothing
    # records not yet acknowledged are written, in a segment starting at the first of them
    for k in range(100, 110):
        sp.append(b"y" * 200, KIND_BINARY, 1_000 + k)
    sp._write_out()
    (path,) = spool.leftover_files()
    assert path.endswith(f".{100:012d}.cap")
    spool.close()
    again = Spool(folder, max_bytes=1 << 30)
    (left,) = again.leftovers()
    chunk, first = left.take()
    assert first == 100 and again.damaged == 0
    again.close()


def test_recording_writes_every_record(tmp_path):
    folder, kept = str(tmp_path / "spool"), str(tmp_path / "recorded")
    spool = Spool(folder, max_bytes=1 << 30, keep_dir=kept)
    sp = _unthreaded(spool)
    for k in range(100):
        sp.append(b"x" * 200, KIND_BINARY, 1_000 + k)
    sp.take()
    sp.release(99)
    sp._write_out()
    assert len(spool.leftover_files()) == 1  # the recording's open segment
    spool.close()
