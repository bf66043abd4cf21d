"""The spool: every message the daemon receives, on disk before anything else.

Each connection's stream is appended, as received, to segmented capture files
(``<dir>/<stream>.<first_seq>.cap``, the capture format, so ``ingestor
replay`` and ``ingestor decode`` read them).  The pipeline reads the stream
back from the spool, never from the socket: while the database is away the
pipeline stops (the writer's queue is full) and the spool simply grows, and
on recovery the pipeline drains it in order before anything newer.  The
writer releases a segment once its stream is committed past the segment's
last record.  Segments left by a crash are replayed at the next start
(exactly once, through the stream offsets).

Writing needs nothing from the database: raw messages, no instrument ids.
Committed segments are deleted, or, with a ``keep_dir``, moved there: the
daemon's optional raw recording, rotating capture files.  The spool is
bounded (``max_bytes``): it alarms near the bound and, at it,
refuses new messages and counts them (``dropped``), loudly.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

from ingestor.feed.capture import RECORD_HEADER, CaptureHeader, CaptureWriter

log = logging.getLogger(__name__)


@dataclass
class Segment:
    path: str
    stream: str
    first_seq: int
    writer: CaptureWriter | None
    #: bytes of whole records handed to the OS (what a reader may read)
    flushed: int = 0
    #: sequence number after the last record flushed
    end_seq: int = 0
    closed: bool = False


class StreamSpool:
    """The spool of one stream: append (handed to the OS at once), read back, release."""

    def __init__(self, spool: "Spool", stream: str, first_seq: int = 0):
        self.spool = spool
        self.stream = stream
        self.next_seq = first_seq
        self.segments: list[Segment] = []
        self._read_seg = 0
        self._read_pos = 0
        self._read_seq = first_seq
        self._new_segment()

    def _new_segment(self) -> None:
        if self.segments:
            last = self.segments[-1]
            last.writer.sync()
            last.writer.close()
            last.closed = True
        path = os.path.join(self.spool.dir, f"{self.stream}.{self.next_seq:012d}.cap")
        w = CaptureWriter(path, CaptureHeader(stream=self.stream, first_seq=self.next_seq),
                          buffer_size=1 << 20)
        seg = Segment(path, self.stream, self.next_seq, w, flushed=w.bytes, end_seq=self.next_seq)
        self.segments.append(seg)
        self.spool.bytes += w.bytes
        if self._read_seg == len(self.segments) - 1:
            self._read_pos = w.bytes

    def append(self, payload: bytes, kind: int, recv_ns: int) -> int | None:
        """Spool one message; returns its sequence number (None: the spool is full)."""
        sp = self.spool
        size = RECORD_HEADER.size + len(payload)
        if sp.bytes + size > sp.max_bytes:
            sp.dropped += 1
            if sp.dropped == 1 or sp.dropped % 10_000 == 0:
                log.error("spool full (%d bytes, limit %d): %d message(s) dropped; the database "
                          "has been away too long", sp.bytes, sp.max_bytes, sp.dropped)
            return None
        seg = self.segments[-1]
        if seg.writer.bytes + size > sp.segment_bytes and seg.writer.records:
            self._new_segment()
            seg = self.segments[-1]
        seq = seg.writer.write(payload, kind, recv_ns)
        # Hand it to the OS now: a SIGKILL then loses nothing received (the
        # page cache outlives the process; fsync at a cadence covers the rest).
        seg.writer.flush()
        seg.flushed = seg.writer.bytes
        seg.end_seq = seq + 1
        self.next_seq = seq + 1
        sp.bytes += size
        if not sp.alarmed and sp.bytes >= sp.alarm_bytes:
            sp.alarmed = True
            log.error("spool at %.0f%% of its limit (%d of %d bytes)", 100 * sp.bytes / sp.max_bytes,
                      sp.bytes, sp.max_bytes)
        return seq

    def read(self, limit: int = 8 << 20) -> tuple[bytes, int] | None:
        """The next flushed whole records not read yet, as ``(chunk, first_seq)``."""
        while self._read_seg < len(self.segments):
            seg = self.segments[self._read_seg]
            if self._read_pos < seg.flushed:
                from ingestor._core import capture_span

                with open(seg.path, "rb") as f:
                    f.seek(self._read_pos)
                    want = min(limit, seg.flushed - self._read_pos)
                    data = f.read(want)
                end, count = capture_span(data, 1 << 28)
                if count == 0:  # one record larger than limit: read it whole
                    with open(seg.path, "rb") as f:
                        f.seek(self._read_pos)
                        data = f.read(seg.flushed - self._read_pos)
                    end, count = capture_span(data, 1 << 28)
                seq = self._read_seq
                self._read_pos += end
                self._read_seq = seq + count
                return data[:end], seq
            if seg.closed and self._read_seg < len(self.segments) - 1:
                self._read_seg += 1
                nxt = self.segments[self._read_seg]
                self._read_pos = _data_offset(nxt.path)
                continue
            return None
        return None

    def release(self, committed_seq: int) -> int:
        """Delete closed segments wholly at or below ``committed_seq``; returns bytes freed."""
        freed = 0
        keep = []
        for i, seg in enumerate(self.segments):
            done = seg.closed and seg.end_seq - 1 <= committed_seq and i < self._read_seg
            if done:
                freed += _remove(seg.path, self.spool.keep_dir)
            else:
                keep.append(seg)
        self._read_seg -= len(self.segments) - len(keep)
        self.segments = keep
        self.spool.bytes -= freed
        if self.spool.alarmed and self.spool.bytes < self.spool.alarm_bytes * 0.9:
            self.spool.alarmed = False
            log.warning("spool back under its alarm level (%d bytes)", self.spool.bytes)
        return freed

    def close(self, committed_seq: int) -> None:
        """Close the stream; delete its files if everything in them is committed."""
        seg = self.segments[-1]
        seg.writer.sync()
        seg.writer.close()
        seg.closed = True
        if committed_seq >= self.next_seq - 1:
            for s in self.segments:
                self.spool.bytes -= _remove(s.path, self.spool.keep_dir)
            self.segments = []


def _data_offset(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(12)
    return 12 + int.from_bytes(head[8:12], "little")


def _remove(path: str, keep_dir: str | None = None) -> int:
    """Delete a released segment, or move it into ``keep_dir`` (the raw recording)."""
    try:
        size = os.path.getsize(path)
        if keep_dir:
            os.replace(path, os.path.join(keep_dir, os.path.basename(path)))
        else:
            os.unlink(path)
        return size
    except FileNotFoundError:
        return 0


class Spool:
    """All streams' spools in one directory, with one size bound."""

    def __init__(self, dir: str, max_bytes: int = 2 << 30, alarm_at: float = 0.8,
                 segment_bytes: int = 64 << 20, keep_dir: str | None = None):
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
        self.dropped = 0
        self.alarmed = False
        self.bytes = sum(os.path.getsize(p) for p in self.leftovers())

    def leftovers(self) -> list[str]:
        """Segment files already in the directory (a previous run's), in stream order."""
        return sorted(glob.glob(os.path.join(self.dir, "*.cap")))

    def stream(self, stream: str, first_seq: int = 0) -> StreamSpool:
        return StreamSpool(self, stream, first_seq)
