"""The spool: a write-ahead log of every message the daemon receives.

The feed appends each message as it arrives (``StreamSpool.append``, on the
event loop: a memory copy, no system call).  From there it goes two ways:

* to disk, by the spool's own thread (``Spool``'s writer thread): segmented
  capture files ``<dir>/<stream>.<first_seq>.cap`` (the capture format, so
  ``ingestor replay`` and ``ingestor decode`` read them), handed to the OS
  every few milliseconds, fsynced at a cadence, rotated at ``segment_bytes``
  (the closed segment fsynced first) -- no file I/O on the event loop; what was
  released before the thread came to it (a feed's publish the log acknowledged
  within those milliseconds) is not written at all;
* to the pipeline, in memory (``StreamSpool.take``): what was appended since
  the last take, as one chunk of capture records, so the pipeline's C walk
  reads it without a Python call per message.

The disk is read back only for backlog.  The in-memory tail is bounded
(``memory_bytes``): when the pipeline falls behind (the database is away, the
pipeline pauses) the tail is dropped and the stream goes on disk-only; the
consumer then reads the segments from where it stands and, once it has
caught up with what is on disk, takes the memory tail again.  Segments left
by a crash are read back the same way at the next start (``leftovers``),
while the feed is already connected and appending to new streams.

The writer releases a stream up to its committed sequence number: closed
segments wholly at or below it are deleted (or, with ``keep_dir``, moved
there: the raw recording), by the writer thread.  The spool is bounded
(``max_bytes``): it alarms near the bound and, at it, refuses new messages
and counts them (``dropped``), loudly.

Locking: one daemon per spool folder (``lock``): the folder holds a lock file
with the holder's pid, held with ``flock`` for the daemon's life; a second
daemon gets one line naming that pid.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

from ingestor.feed.capture import (RECORD2_HEADER, RECORD_HEADER, RECORD_OVERHEAD, Block,
                                   CaptureHeader, CaptureReader, CaptureWriter, RecordScanner,
                                   read_blocks, record_offset)

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
#: where segments with damaged records go once read (never deleted: they hold what could not
#: be replayed); outside the ``*.cap`` the next start replays
DAMAGED_DIR = "damaged"
#: a leftover's end (its last sequence number + 1) until reading finds it
UNKNOWN_END = 1 << 62
#: ``_read_segment``: the segment was read to its end
_EXHAUSTED = object()
#: what a record takes on disk beyond what it takes in memory (the format-2 header)
_RECORD_GROWTH = RECORD2_HEADER.size - RECORD_HEADER.size
#: beside each segment (``<segment>.batches``): the last sequence number of each message
#: the log (``--role feed``) published while it was the stream's newest, u64 LE each, so that
#: a restarted feed publishes a leftover in the same messages (the same ids: JetStream's
#: duplicate window drops those it has); deleted with the segment
BATCHES_SUFFIX = ".batches"
MAX_BATCH_ENDS = 1 << 21


class SpoolInUse(Exception):
    """Another process holds the spool folder."""


@dataclass
class Segment:
    path: str
    first_seq: int
    #: sequence number after the last record written to the file
    end_seq: int
    #: bytes written (header included)
    size: int
    closed: bool = False
    #: capture format of the file (a leftover of an older version may be 1)
    version: int = 2
    #: damaged records were met in it: kept (moved to ``DAMAGED_DIR``), never deleted
    damaged: bool = False


class StreamSpool:
    """One stream (a connection's life) in the spool: append, take, release.

    ``append`` runs on the event loop; the spool's writer thread moves what
    was appended to disk; ``take`` (the pipeline's side, on the loop) gets the
    next records in order, from memory or, for backlog, from disk.
    """

    def __init__(self, spool: "Spool", stream: str, first_seq: int = 0, *,
                 recovered: list[Segment] | None = None, broker: str = "kite"):
        self.spool = spool
        self.stream = stream
        #: whose protocol the records are (the segments' capture header): which decoder reads
        #: them back
        self.broker = broker
        self._lock = threading.Lock()
        #: next sequence number to append
        self.next_seq = first_seq
        self.segments: list[Segment] = list(recovered or [])
        #: appended, not yet handed to the writer thread: [_pending_first, next_seq)
        self._pending = bytearray()
        self._pending_first = first_seq
        #: records the writer thread is writing now (neither pending nor readable on disk)
        self._in_flight = 0
        #: the in-memory tail for the consumer: [_mem_first, next_seq) when ``_live``
        self._mem = bytearray()
        self._mem_first = first_seq
        self._mem_count = 0
        self._live = recovered is None
        #: a leftover of an earlier run (its committed number is the database's)
        self.recovered = recovered is not None
        #: next sequence number the consumer takes
        self.read_seq = recovered[0].first_seq if recovered else first_seq
        self._cursor: tuple[str, int, int] | None = None  # (segment path, offset, seq)
        #: no more appends (the connection ended, or a leftover of an earlier run)
        self.ended = recovered is not None
        self.committed = -1
        #: called (from any thread) when records become takeable
        self.wakeup = None
        self.closed = False
        #: batch ends (``mark``) not yet written beside the segments, the file they go to
        #: and the segment it belongs to
        self._marks: list[int] = []
        self._marks_file = None
        self._marks_seg: str | None = None
        #: a leftover's batch ends as an earlier run's feed published them, and the largest
        self.batch_ends: frozenset[int] = frozenset()
        self.batch_end_max = -1

    # -- the feed's side (event loop) ------------------------------------------

    def append(self, payload: bytes, kind: int, recv_ns: int) -> int | None:
        """Spool one message; returns its sequence number (None: the spool is full)."""
        sp = self.spool
        size = RECORD2_HEADER.size + len(payload)  # what it takes on disk
        if sp.bytes + size > sp.max_bytes:
            sp.dropped += 1
            if sp.dropped == 1 or sp.dropped % 10_000 == 0:
                log.error("spool full (%d bytes, limit %d): %d message(s) dropped; the database "
                          "has been away too long", sp.bytes, sp.max_bytes, sp.dropped)
            return None
        rec = RECORD_HEADER.pack(recv_ns, kind, len(payload))
        with self._lock:
            seq = self.next_seq
            first = not self._pending
            self._pending += rec
            self._pending += payload
            self.next_seq = seq + 1
            if self._live:
                if len(self._mem) + size > sp.memory_bytes and self._mem_count:
                    # the consumer is behind: drop the tail, read the disk back later
                    self._live = False
                    self._mem = bytearray()
                    self._mem_count = 0
                else:
                    self._mem += rec
                    self._mem += payload
                    self._mem_count += 1
        sp.add_bytes(size)
        if first:  # the writer thread needs one signal per write-out, not one per message
            sp.kick()
        if self.wakeup is not None:
            self.wakeup()
        return seq

    def mark(self, last_seq: int) -> None:
        """The log published records up to ``last_seq`` in one message (kept beside the
        segments by the writer thread: ``BATCHES_SUFFIX``)."""
        with self._lock:
            first = not self._marks
            self._marks.append(last_seq)
        if first:
            self.spool.kick()

    def end(self) -> None:
        """No more appends: the writer thread closes the last segment."""
        self.ended = True
        self.spool.kick()
        if self.wakeup is not None:
            self.wakeup()

    # -- the consumer's side ----------------------------------------------------

    @property
    def consumed(self) -> bool:
        """Everything appended was taken, and nothing more will be."""
        return self.ended and self.read_seq >= self.next_seq

    @property
    def waiting_bytes(self) -> int:
        """Bytes appended and not yet taken from memory (unbounded while reading backlog:
        there is always enough waiting)."""
        return len(self._mem) if self._live else 1 << 62

    def skip_to(self, seq: int) -> None:
        """Start reading at ``seq`` (a leftover's records at or below its committed number
        are not read back at all)."""
        with self._lock:
            if seq > self.read_seq and not self._live:
                self.read_seq = seq
                self._cursor = None

    def take(self, limit: int = 8 << 20) -> tuple[bytes, int] | None:
        """The next records in order, as ``(chunk of capture records, first_seq)``, or None."""
        with self._lock:
            if self._live:
                return self._take_memory()
        # backlog: from the segments, up to what the writer thread has written
        got = self._read_disk(limit)
        if got is not None:
            return got
        with self._lock:
            # caught up with the disk: take the memory tail again (what is appended and not
            # yet written is exactly the pending buffer)
            if (not self._live and not self._in_flight
                    and self.read_seq == self._pending_first and not self.ended):
                self._live = True
                self._mem = bytearray(self._pending)
                self._mem_first = self._pending_first
                self._mem_count = self.next_seq - self._pending_first
                return self._take_memory()
        return None

    def _take_memory(self) -> tuple[bytes, int] | None:
        # (lock held) the whole in-memory tail as one chunk
        if not self._mem_count:
            return None
        chunk, first = bytes(self._mem), self._mem_first
        self._mem_first += self._mem_count
        self._mem = bytearray()
        self._mem_count = 0
        self.read_seq = self._mem_first
        return chunk, first

    def _read_disk(self, limit: int) -> tuple[bytes, int] | None:
        with self._lock:
            segs = list(self.segments)
        for seg in segs:
            if seg.end_seq <= self.read_seq:
                continue
            if seg.first_seq > self.read_seq:
                # the records between the last intact one before this segment and its first
                # were lost to damage (a segment's end is the next one's start)
                self._note_damage(seg, 0, seg.first_seq - self.read_seq)
                self.read_seq = seg.first_seq
                self._cursor = None
            got = self._read_segment(seg, limit)
            if got is not _EXHAUSTED:
                return got
        if self.recovered and self.next_seq == UNKNOWN_END:
            # a leftover read to its end
            last = segs[-1].end_seq if segs else self.read_seq
            if self.read_seq >= last:
                self.next_seq = self.read_seq
        return None

    def _read_segment(self, seg: Segment, limit: int):
        """The next block of intact records of ``seg`` at ``read_seq`` (None: the writer thread
        has not written further yet; ``_EXHAUSTED``: read to its end, ``end_seq`` set)."""
        _, off, seq = self._seek(seg)
        max_record = self.spool.max_record
        with open(seg.path, "rb") as f:
            while off < seg.size:
                sc = RecordScanner(seg.version, seq, max_record)
                blocks = read_blocks(f, off, sc, end=seg.size, final=seg.closed,
                                     chunk_size=limit)
                b: Block | None = next(blocks, None)
                blocks.close()
                if b is not None:
                    # damage before it (or records a seek jumped over: read_seq, not seq)
                    if b.start > off or b.first_seq > self.read_seq:
                        self._note_damage(seg, b.start - off, b.first_seq - self.read_seq)
                    self._cursor = (seg.path, b.end, b.first_seq + b.count)
                    self.read_seq = b.first_seq + b.count
                    return bytes(b.data), b.first_seq
                if not seg.closed:
                    return None  # the writer thread is mid-write: it writes whole records
                # closed, nothing intact up to the end: damage, or a record a crash cut
                if sc.damaged_bytes:
                    self._note_damage(seg, sc.damaged_bytes, 0)
                if sc.truncated_bytes:
                    log.warning("spool segment %s ends inside a record (%d bytes ignored): a "
                                "crash while writing?", seg.path, sc.truncated_bytes)
                off = seg.size
        if not seg.closed:
            return None
        seg.end_seq = seq  # a leftover's real end (or where damage took its last records)
        if seq > self.read_seq:
            self.read_seq = seq
        return _EXHAUSTED

    def _note_damage(self, seg: Segment, nbytes: int, lost: int) -> None:
        sp = self.spool
        seg.damaged = True
        sp.damaged += 1
        sp.damaged_bytes += nbytes
        sp.lost_records += lost
        log.error("spool segment %s: damaged record(s) skipped (%d bytes, %d record(s) lost); "
                  "the intact records after them are read on, the file is kept in %s/",
                  seg.path, nbytes, lost, DAMAGED_DIR)

    def _seek(self, seg: Segment) -> tuple[str, int, int]:
        """File offset of ``read_seq`` in ``seg`` (walking records when not cached), and the
        sequence number there (later than ``read_seq`` when damage took that record)."""
        if self._cursor is not None and self._cursor[0] == seg.path and self._cursor[2] == self.read_seq:
            return self._cursor
        off, seq = _data_offset(seg.path), seg.first_seq
        if self.read_seq <= seq:
            return (seg.path, off, seq)
        extra = RECORD_OVERHEAD[seg.version] - RECORD_HEADER.size
        sc = RecordScanner(seg.version, seq, self.spool.max_record)
        with open(seg.path, "rb") as f:
            for b in read_blocks(f, off, sc, end=seg.size, final=seg.closed):
                if b.first_seq + b.count <= self.read_seq:
                    off, seq = b.end, b.first_seq + b.count
                    continue
                if b.first_seq >= self.read_seq:
                    return (seg.path, b.start, b.first_seq)
                # read_seq is inside this block: walk its records to it
                k = self.read_seq - b.first_seq
                return (seg.path, b.start + record_offset(b.data, k) + extra * k, self.read_seq)
        return (seg.path, seg.size, seq)

    def release(self, committed_seq: int) -> None:
        """Everything up to ``committed_seq`` is in the database: the writer thread deletes
        (or keeps, recording) the segments wholly at or below it."""
        if committed_seq > self.committed:
            self.committed = committed_seq
            self.spool.kick()

    # -- the writer thread's side -------------------------------------------------

    def _write_out(self) -> None:
        with self._lock:
            released = False
            if not self._pending:
                data = None
            else:
                data, first = self._pending, self._pending_first
                count = self.next_seq - first
                self._pending = bytearray()
                self._pending_first = self.next_seq
                # already released (a feed's publish acknowledged by the log before this
                # thread came to it): nothing to keep, unless recording
                released = first + count - 1 <= self.committed and not self.spool.keep_dir
                self._in_flight = 0 if released else count
        if data is not None and released:
            # every earlier record is released too: the open segment is closed (no fsync:
            # nothing in it is needed) and goes with the others below; the next write
            # opens a segment at its own first record
            seg = self.segments[-1] if self.segments and not self.segments[-1].closed else None
            if seg is not None:
                self._close_segment(seg, sync=False)
            self.spool.add_bytes(-(len(data) + count * _RECORD_GROWTH))
        elif data is not None:
            sp = self.spool
            seg = self.segments[-1] if self.segments and not self.segments[-1].closed else None
            if seg is not None and seg.size >= sp.segment_bytes:
                self._close_segment(seg)
                seg = None
            if seg is None:
                seg = self._open_segment(first)
            w = sp._writers[seg.path]
            w.write_raw(data, count)
            w.flush()
            with self._lock:
                seg.size = w.bytes
                seg.end_seq = first + count
                self._in_flight = 0
            if not self._live and self.wakeup is not None:
                self.wakeup()  # backlog became readable
        with self._lock:
            marks, self._marks = self._marks, []
        if marks and self.segments:
            seg = self.segments[-1].path
            if self._marks_seg != seg:
                self._close_marks()
                self._marks_file = open(seg + BATCHES_SUFFIX, "ab")
                self._marks_seg = seg
            self._marks_file.write(struct.pack(f"<{len(marks)}Q", *marks))
            self._marks_file.flush()
        if self.ended and self.segments and not self.segments[-1].closed and not self._pending:
            self._close_segment(self.segments[-1])
        self._release_files()

    def _open_segment(self, first_seq: int) -> Segment:
        sp = self.spool
        path = os.path.join(sp.dir, f"{self.stream}.{first_seq:012d}.cap")
        w = CaptureWriter(path, CaptureHeader(broker=self.broker, stream=self.stream,
                                              first_seq=first_seq),
                          buffer_size=1 << 20)
        sp._writers[path] = w
        seg = Segment(path, first_seq, first_seq, w.bytes)
        sp.add_bytes(w.bytes)
        with self._lock:
            self.segments.append(seg)
        return seg

    def _close_segment(self, seg: Segment, sync: bool = True) -> None:
        w = self.spool._writers.pop(seg.path, None)
        if w is not None:
            if sync:
                w.sync()
            w.close()
        seg.closed = True

    def _release_files(self) -> None:
        keep = []
        for seg in self.segments:
            if seg.closed and seg.end_seq - 1 <= self.committed and seg.end_seq <= self.read_seq:
                # read to its end and committed: deleted (or kept, recording); one with damaged
                # records is moved aside instead, never deleted
                self.spool.add_bytes(-_remove(seg.path, self.spool.keep_dir, seg.damaged))
                if self._marks_seg == seg.path:
                    self._close_marks()
                _remove(seg.path + BATCHES_SUFFIX)
            else:
                keep.append(seg)
        if len(keep) != len(self.segments):
            with self._lock:
                self.segments = keep
                if self._cursor is not None and all(s.path != self._cursor[0] for s in keep):
                    self._cursor = None
        if self.ended and not self.segments and not self._pending and self.consumed:
            self.closed = True
            self._close_marks()

    def _close_marks(self) -> None:
        if self._marks_file is not None:
            self._marks_file.close()
            self._marks_file = None
            self._marks_seg = None

    def _fsync(self) -> None:
        if self.segments and not self.segments[-1].closed:
            w = self.spool._writers.get(self.segments[-1].path)
            if w is not None:
                w.sync()


def read_batch_ends(path: str) -> tuple[int, ...]:
    """The batch ends kept in ``path`` (a torn last entry ignored; none when unreadable: they
    only choose message boundaries, any value is safe; at most ``MAX_BATCH_ENDS`` of them,
    a segment's worth many times over)."""
    try:
        with open(path, "rb") as f:
            data = f.read(8 * MAX_BATCH_ENDS)
    except OSError:
        return ()
    n = len(data) // 8
    return struct.unpack_from(f"<{n}Q", data) if n else ()


def _data_offset(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(12)
    return 12 + int.from_bytes(head[8:12], "little")


def _remove(path: str, keep_dir: str | None = None, damaged: bool = False) -> int:
    """Delete a released segment, or move it into ``keep_dir`` (the raw recording), or, when
    it held damaged records, into ``DAMAGED_DIR`` beside it (a person decides)."""
    try:
        size = os.path.getsize(path)
        if damaged:
            aside = os.path.join(os.path.dirname(path), DAMAGED_DIR)
            os.makedirs(aside, exist_ok=True)
            os.replace(path, os.path.join(aside, os.path.basename(path)))
            log.error("spool segment %s held damaged records: moved to %s/ (not deleted)",
                      path, aside)
        elif keep_dir:
            os.replace(path, os.path.join(keep_dir, os.path.basename(path)))
        else:
            os.unlink(path)
        return size
    except FileNotFoundError:
        return 0


class Spool:
    """All streams' spools in one directory, with one size bound and one writer thread."""

    def __init__(self, dir: str, max_bytes: int = 2 << 30, alarm_at: float = 0.8,
                 segment_bytes: int = 64 << 20, keep_dir: str | None = None,
                 fsync_interval: float = 0.2, memory_bytes: int = 64 << 20,
                 max_record: int = 1 << 28):
        self.dir = dir
        os.makedirs(dir, exist_ok=True)
        #: where committed segments go instead of being deleted (the raw recording:
        #: capture files rotating at ``segment_bytes``, one stream per connection)
        self.keep_dir = keep_dir or None
        if self.keep_dir:
            os.makedirs(self.keep_dir, exist_ok=True)
        self.max_bytes = max_bytes
        self.alarm_bytes = int(max_bytes * alarm_at)
        self.segment_bytes = segment_bytes
        self.fsync_interval = fsync_interval
        self.memory_bytes = memory_bytes
        self.max_record = max_record
        #: seconds the writer thread waits after the first new append to gather more
        self.write_delay = 0.01
        self.dropped = 0
        #: damaged stretches met reading segments back, their bytes, the records they held
        self.damaged = 0
        self.damaged_bytes = 0
        self.lost_records = 0
        self.alarmed = False
        self._bytes_lock = threading.Lock()
        self.bytes = sum(os.path.getsize(p) for p in self.leftover_files())
        self.streams: list[StreamSpool] = []
        self._writers: dict[str, CaptureWriter] = {}
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        #: the writer thread's last error (the daemon reports it), None while healthy
        self.error: str | None = None

    # -- one process per folder ---------------------------------------------------

    def lock(self) -> None:
        """Hold the folder for this process; ``SpoolInUse`` names the holder otherwise."""
        path = os.path.join(self.dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise SpoolInUse(f"the spool folder {self.dir} is in use by process {holder}: "
                             f"one daemon per spool folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- streams ------------------------------------------------------------------

    def leftover_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, "*.cap")))

    def leftovers(self) -> list[StreamSpool]:
        """The streams a previous run left (a crash, a stop with the database away), in the
        order they were received: streams by their first record's receive time, each
        stream's segments by sequence number.  (Stream ids carry a random part, so names
        alone do not sort by time; replaying a later stream first would stamp the earlier
        one's ticks after it.)  Their records are read back from disk by ``take``."""
        info = []
        for path in self.leftover_files():
            try:
                with CaptureReader(path) as rd:
                    info.append((rd.header.stream, rd.header.first_seq, rd.first_recv_ns(), path,
                                 os.path.getsize(path), rd.version, rd.header.broker))
            except (OSError, ValueError) as exc:
                log.error("spool file %s is unreadable (%s): left in place", path, exc)
        start: dict[str, int] = {}
        for stream, _, first_ns, *_ in sorted(info, key=lambda x: (x[0], x[1])):
            start.setdefault(stream, first_ns)
        by_stream: dict[str, list] = {}
        for item in sorted(info, key=lambda x: (start[x[0]], x[0], x[1])):
            by_stream.setdefault(item[0], []).append(item)
        out = []
        for stream, items in by_stream.items():
            segs = []
            for i, (_, first_seq, _, path, size, version, _) in enumerate(items):
                # a segment's end is the next one's start; the last one's is found by reading
                end = items[i + 1][1] if i + 1 < len(items) else UNKNOWN_END
                segs.append(Segment(path, first_seq, end, size, closed=True, version=version))
            # a stream is one connection's: one broker (its first segment's header says which)
            sp = StreamSpool(self, stream, recovered=segs, broker=items[0][6])
            sp.next_seq = UNKNOWN_END
            ends = frozenset(e for seg in segs
                             for e in read_batch_ends(seg.path + BATCHES_SUFFIX))
            sp.batch_ends, sp.batch_end_max = ends, max(ends, default=-1)
            out.append(sp)
            self.streams.append(sp)
        # batch ends of a segment no longer there (stopped between the two deletions)
        for path in glob.glob(os.path.join(self.dir, "*.cap" + BATCHES_SUFFIX)):
            if not os.path.exists(path[:-len(BATCHES_SUFFIX)]):
                _remove(path)
        return out

    def stream(self, stream: str, first_seq: int = 0, broker: str = "kite") -> StreamSpool:
        sp = StreamSpool(self, stream, first_seq, broker=broker)
        self.streams.append(sp)
        self.start()
        return sp

    def add_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self.bytes += n
            b = self.bytes
        if not self.alarmed and b >= self.alarm_bytes:
            self.alarmed = True
            log.error("spool at %.0f%% of its limit (%d of %d bytes)", 100 * b / self.max_bytes,
                      b, self.max_bytes)
        elif self.alarmed and b < self.alarm_bytes * 0.9:
            self.alarmed = False
            log.warning("spool back under its alarm level (%d bytes)", b)

    # -- the writer thread -----------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            if self._kick.wait(self.fsync_interval) and not self._stop.is_set():
                # a short pause gathers what arrives meanwhile into one write (fewer wake-ups
                # of this thread, which would otherwise take the GIL from the loop hundreds of
                # times a second)
                time.sleep(self.write_delay)
            self._kick.clear()
            stopping = self._stop.is_set()
            try:
                for sp in list(self.streams):
                    sp._write_out()
                    if sp.closed:
                        self.streams.remove(sp)
                if time.monotonic() - last_sync >= self.fsync_interval or stopping:
                    last_sync = time.monotonic()
                    for sp in list(self.streams):
                        sp._fsync()
                self.error = None
            except OSError as exc:
                if self.error is None:
                    log.error("spool: cannot write: %s", exc)
                self.error = str(exc)
                time.sleep(0.1)
            if stopping:
                return

    def close(self) -> None:
        """Write out and fsync everything appended, close the files, stop the thread."""
        for sp in self.streams:
            sp.ended = True
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            for sp in list(self.streams):
                sp._write_out()
        for w in list(self._writers.values()):
            try:
                w.sync()
                w.close()
            except (OSError, ValueError):
                pass
        self._writers.clear()
        for sp in self.streams:
            sp._close_marks()
        self.unlock()
