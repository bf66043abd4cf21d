"""Capture files (``.cap``): the raw broker stream, recorded and replayed.

Layout (DESIGN.md, "Capture file"; format 2 since the record framing below)::

    8 bytes  magic b"INGCAP02" (b"INGCAP01": format 1, still read)
    4 bytes  uint32 LE header length H
    H bytes  UTF-8 JSON header: {"broker": ..., "stream": ..., "first_seq": ...}
    records to the end of the file, format 2:
      4 bytes marker b"\x89REC"
      8 bytes u64 LE sequence number (the first record's is first_seq, then + 1 each)
      8 bytes u64 LE receive time (ns since the epoch, UTC)
      1 byte  kind: 1 binary WebSocket message, 2 text message
      4 bytes u32 LE payload length
      4 bytes u32 LE CRC-32 (zlib's) of the 21 bytes after the marker, then the payload
      payload
    format 1 records are the same without marker, sequence number and CRC (13 bytes).

Record k has sequence number ``first_seq + k``.  A truncated last record (a
crash while recording) is ignored with a warning.  A *damaged* record (a
wrong marker, length or checksum: a disk or a copy went wrong) is skipped and
counted: the reader finds the next intact record after it (its marker, its
checksum and a sequence number after the last one read) and goes on there, so
one bad byte costs the records it touched, not the rest of the file, and the
sequence numbers say exactly which records were lost.  Format 1 has no means
to resynchronise: its reader stops at a damaged record, counting the bytes
left.  Reading streams in chunks, so files of any size are read in bounded
memory; the records are handed on in format 1 (what ``KiteDecoder`` walks),
checked and unframed in C.
"""

from __future__ import annotations

import json
import re
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ingestor._core import capture2_frame, capture2_resync, capture2_unframe, capture_span

MAGIC = b"INGCAP02"
MAGIC_V1 = b"INGCAP01"
VERSIONS = {MAGIC_V1: 1, MAGIC: 2}
KIND_BINARY = 1
KIND_TEXT = 2
#: a format-1 record's header, and what the reader hands on: recv_ns, kind, length (13 bytes)
RECORD_HEADER = struct.Struct("<QBI")
#: a format-2 record's header: marker, seq, recv_ns, kind, length, crc (29 bytes)
RECORD2_HEADER = struct.Struct("<4sQQBII")
RECORD2_MARKER = b"\x89REC"
#: bytes a record takes on disk beyond its payload, per format
RECORD_OVERHEAD = {1: RECORD_HEADER.size, 2: RECORD2_HEADER.size}
_CAP2_OK, _CAP2_PARTIAL, _CAP2_BAD, _CAP2_GAP, _CAP2_NONE = range(5)
_HLEN = struct.Struct("<I")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 28  # a WebSocket message of 256 MiB is not a real one
#: sequence numbers stay far from int64's end (record k is first_seq + k)
MAX_FIRST_SEQ = 1 << 62
#: stream and broker names: they become file names (spool segments, dead letters) and
#: database keys, so no path separators, NULs or unbounded lengths
STREAM_NAME = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}")

log = logging.getLogger(__name__)


def iter_records(chunk) -> Iterator[tuple[int, int, int, int]]:
    """``(offset of payload, length, recv_ns, kind)`` of each format-1 record of a spool
    chunk (what ``StreamSpool.take`` returns: whole records, checked when read)."""
    pos, n, size = 0, len(chunk), RECORD_HEADER.size
    unpack = RECORD_HEADER.unpack_from
    while pos + size <= n:
        recv_ns, kind, length = unpack(chunk, pos)
        pos += size
        yield pos, length, recv_ns, kind
        pos += length


def record_offset(records, k: int) -> int:
    """Byte offset of the ``k``-th format-1 record of ``records`` (whole records)."""
    pos, size, unpack = 0, RECORD_HEADER.size, RECORD_HEADER.unpack_from
    for _ in range(k):
        pos += size + unpack(records, pos)[2]
    return pos


class CaptureError(ValueError):
    """The file is not a capture (bad magic or header): bad input."""


@dataclass
class CaptureHeader:
    broker: str = "kite"
    stream: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_seq: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        obj = dict(self.extra)
        obj.update(broker=self.broker, stream=self.stream, first_seq=self.first_seq)
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "CaptureHeader":
        try:
            obj = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise CaptureError("capture header is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise CaptureError(f"capture header is not UTF-8 JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise CaptureError("capture header is not a JSON object")
        missing = [k for k in ("broker", "stream", "first_seq") if k not in obj]
        if missing:
            raise CaptureError(f"capture header lacks {', '.join(missing)}")
        first_seq = obj.pop("first_seq")
        if (not isinstance(first_seq, int) or isinstance(first_seq, bool)
                or not 0 <= first_seq <= MAX_FIRST_SEQ):
            shown = repr(first_seq)[:40]
            raise CaptureError(f"capture header first_seq must be an integer in 0..2^62, not "
                               f"{shown}")
        broker, stream = obj.pop("broker"), obj.pop("stream")
        for key, value in (("broker", broker), ("stream", stream)):
            if not isinstance(value, str) or not STREAM_NAME.fullmatch(value):
                shown = repr(value)[:40]
                raise CaptureError(f"capture header {key} {shown} is not a name (1 to 128 of "
                                   f"A-Z a-z 0-9 . _ : -, not starting with a dot)")
        return cls(broker=broker, stream=stream, first_seq=first_seq, extra=obj)


class CaptureWriter:
    """Append records to a new capture file.

    ``write(payload, kind, recv_ns)`` buffers; ``flush()`` hands the bytes
    to the OS; ``sync()`` also fsyncs.  Use as a context manager.  Files are
    written in format 2 (``version=1``: the older format, for tests of its reader).
    """

    def __init__(self, path: str | os.PathLike, header: CaptureHeader | None = None,
                 buffer_size: int = 1 << 20, version: int = 2):
        if version not in RECORD_OVERHEAD:
            raise ValueError(f"capture format must be 1 or 2, not {version}")
        self.header = header or CaptureHeader()
        self.path = os.fspath(path)
        self.version = version
        self.overhead = RECORD_OVERHEAD[version]
        self._f: BinaryIO = open(self.path, "wb", buffering=buffer_size)
        raw = self.header.to_json()
        self._f.write((MAGIC if version == 2 else MAGIC_V1) + _HLEN.pack(len(raw)) + raw)
        self.records = 0
        self.bytes = self._f.tell()

    @property
    def next_seq(self) -> int:
        return self.header.first_seq + self.records

    def write(self, payload: bytes | bytearray | memoryview, kind: int = KIND_BINARY,
              recv_ns: int = 0) -> int:
        """Append one record; returns its sequence number."""
        if kind not in (KIND_BINARY, KIND_TEXT):
            raise ValueError(f"record kind must be 1 or 2, not {kind}")
        n = len(payload)
        seq = self.next_seq
        if self.version == 2:
            fields = RECORD2_HEADER.pack(RECORD2_MARKER, seq, recv_ns, kind, n, 0)[4:25]
            crc = zlib.crc32(payload, zlib.crc32(fields))
            self._f.write(RECORD2_MARKER + fields + crc.to_bytes(4, "little"))
        else:
            self._f.write(RECORD_HEADER.pack(recv_ns, kind, n))
        self._f.write(payload)
        self.records += 1
        self.bytes += self.overhead + n
        return seq

    def write_raw(self, records: bytes | bytearray | memoryview, count: int) -> None:
        """Append ``count`` whole records given in format 1 (the spool's writer thread: one
        write for what the feed appended since the last one), framed in C without the GIL."""
        if self.version == 2:
            out = bytearray(len(records) + (RECORD2_HEADER.size - RECORD_HEADER.size) * count)
            n, got = capture2_frame(records, self.next_seq, out)
            if got != count:
                raise ValueError(f"write_raw: {got} records given, {count} announced")
            records = memoryview(out)[:n]
        self._f.write(records)
        self.records += count
        self.bytes += len(records)

    def flush(self) -> None:
        self._f.flush()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Record:
    seq: int
    recv_ns: int
    kind: int
    payload: bytes


@dataclass
class Block:
    """Intact records with consecutive sequence numbers, in format 1 (``data``), and where
    they lay in what was scanned (``start``/``end``: offsets of the first record and just
    past the last one; a file offset when read by ``read_blocks``)."""

    data: memoryview
    first_seq: int
    count: int
    start: int
    end: int


class RecordScanner:
    """Checks a capture's records as they are read, skips and counts damage.

    ``scan(buf, final)`` takes the bytes after what the previous call consumed and
    returns ``(blocks, consumed)``: the intact records found (``Block`` objects, in order) and
    how many bytes of ``buf`` are dealt with (records, damage skipped, a truncated tail when
    ``final``); the rest starts a record that ``buf`` cuts, to be passed again with more
    bytes.  ``final``: nothing follows ``buf`` (the end of the file).

    Counters: ``damaged`` (damaged stretches met), ``damaged_bytes``, ``lost_records``
    (sequence numbers known missing: the records a damaged stretch held; format 2 only),
    ``truncated_bytes`` (a record cut by the end of the file: a crash while writing).
    ``stopped``: format 1 met damage, and cannot go on after it.
    """

    def __init__(self, version: int, next_seq: int, max_payload: int = MAX_PAYLOAD):
        self.version = version
        self.next_seq = next_seq
        self.max_payload = max_payload
        self.damaged = 0
        self.damaged_bytes = 0
        self.lost_records = 0
        self.truncated_bytes = 0
        self.stopped = False
        #: bytes the record at the start of the unconsumed rest needs (0: not known yet)
        self.want = 0
        self._resyncing = False

    def scan(self, buf, final: bool) -> tuple[list[Block], int]:
        if self.stopped:
            self.damaged_bytes += len(buf)
            return [], len(buf)
        if self.version == 1:
            return self._scan_v1(buf, final)
        return self._scan_v2(buf, final)

    def _scan_v1(self, buf, final: bool) -> tuple[list[Block], int]:
        n = len(buf)
        end, count = capture_span(buf, self.max_payload, True)
        blocks = [Block(memoryview(buf)[:end], self.next_seq, count, 0, end)] if count else []
        self.next_seq += count
        self.want = 0
        if n - end >= RECORD_HEADER.size:
            plen = RECORD_HEADER.unpack_from(buf, end)[2]
            if plen > self.max_payload:
                # a whole header claiming more than any record holds: its length is damaged
                self.damaged += 1
                self.damaged_bytes += n - end
                self.stopped = True
                return blocks, n
            self.want = RECORD_HEADER.size + plen
        if final and end < n:
            self.truncated_bytes += n - end
            return blocks, n
        return blocks, end

    def _seq_at(self, buf, pos: int) -> int:
        return int.from_bytes(buf[pos + 4:pos + 12], "little")

    def _resync(self, buf, pos: int, final: bool) -> tuple[int, int]:
        # the next intact record at or after pos whose sequence number is after the last one
        # read (an older one is a stale copy, not where the stream goes on)
        while True:
            q, st = capture2_resync(buf, pos, self.max_payload)
            if st == _CAP2_OK and self._seq_at(buf, q) < self.next_seq:
                pos = q + 1
            elif st == _CAP2_PARTIAL and final:
                pos = q + 1  # cut by the end of the file: not a record
            else:
                return q, st

    def _scan_v2(self, buf, final: bool) -> tuple[list[Block], int]:
        n = len(buf)
        out = None
        opos = 0
        pos = 0
        blocks: list[Block] = []
        self.want = 0
        while pos < n:
            resynced = self._resyncing
            if resynced:
                q, st = self._resync(buf, pos, final)
                self.damaged_bytes += q - pos
                pos = q
                if st != _CAP2_OK:
                    # NONE: the rest of buf is damage; PARTIAL: more bytes decide
                    if st == _CAP2_PARTIAL and n - pos >= RECORD2_HEADER.size:
                        self.want = RECORD2_HEADER.size + RECORD2_HEADER.unpack_from(buf, pos)[4]
                    break
                self._resyncing = False
            if out is None:
                out = bytearray(n)
            p2, olen, count, st = capture2_unframe(buf, pos, self.max_payload, self.next_seq,
                                                   memoryview(out)[opos:])
            if count:
                blocks.append(Block(memoryview(out)[opos:opos + olen], self.next_seq, count,
                                    pos, p2))
                opos += olen
                self.next_seq += count
                pos = p2
            if st == _CAP2_OK:
                break
            if st == _CAP2_PARTIAL:
                if not final:
                    if n - pos >= RECORD2_HEADER.size:
                        self.want = RECORD2_HEADER.size + RECORD2_HEADER.unpack_from(buf, pos)[4]
                    break
                # cut by the end of the file: the last record of a crash, unless an intact
                # record follows (then its length was damaged)
                q, st2 = self._resync(buf, pos + 1, final)
                if st2 != _CAP2_OK:
                    self.truncated_bytes += n - pos
                    pos = n
                    break
                st = _CAP2_BAD
            if st == _CAP2_GAP:
                seq = self._seq_at(buf, pos)
                if seq > self.next_seq:
                    # intact, and later than expected: the records between are lost
                    if not resynced or count:  # (else counted with the stretch before it)
                        self.damaged += 1
                    self.lost_records += seq - self.next_seq
                    self.next_seq = seq
                    continue
                st = _CAP2_BAD  # a record read already: a stale copy, not the stream
            # damaged: skip it, find the next intact record
            self.damaged += 1
            self.damaged_bytes += 1
            pos += 1
            self._resyncing = True
        return blocks, pos


def read_blocks(f: BinaryIO, offset: int, scanner: RecordScanner, *, end: int | None = None,
                final: bool = True, chunk_size: int = 1 << 22) -> Iterator[Block]:
    """The intact records of the open file ``f`` from ``offset`` (a record boundary) up to
    ``end`` (None: the end of the file), as ``Block`` objects with file offsets.  ``final``: nothing
    will follow ``end`` (a cut record there is a truncated tail, not one still being
    written).  Memory is bounded by ``chunk_size`` and the longest record."""
    fd = f.fileno()
    carry = b""
    base = pos = offset  # base: the file offset of carry[0]
    while True:
        size = max(chunk_size, scanner.want - len(carry))
        if end is not None:
            size = min(size, end - pos)
        data = os.pread(fd, size, pos) if size > 0 else b""
        pos += len(data)
        at_end = not data or (end is not None and pos >= end)
        buf = carry + data if carry else data
        if not buf:
            return
        blocks, consumed = scanner.scan(buf, final and at_end)
        for b in blocks:
            b.start += base
            b.end += base
            yield b
        if scanner.stopped:  # format 1 after damage: the rest of the file is unreadable
            rest = (end if end is not None else os.fstat(fd).st_size) - pos
            scanner.damaged_bytes += max(0, rest)
            return
        carry = bytes(memoryview(buf)[consumed:])
        base += consumed
        if at_end:
            return


@dataclass
class Damage:
    """One damaged stretch of a capture: the file offsets ``start`` (where the intact records
    stop) and ``end`` (where they go on; the file's end when none follow), and the records
    known lost in it: ``lost`` sequence numbers from ``first_lost`` (0: the bytes were
    damaged but no whole record is known missing; None: not known, the stretch runs to the
    end of the file or format 1 stopped there)."""

    start: int
    end: int
    first_lost: int
    lost: int | None

    @property
    def bytes(self) -> int:
        return self.end - self.start

    def describe(self, path: str) -> str:
        if self.lost is None:
            what = f"records from seq {self.first_lost} on not readable"
        elif self.lost == 0:
            what = "no record lost"
        elif self.lost == 1:
            what = f"record seq {self.first_lost} lost"
        else:
            what = f"records seq {self.first_lost}..{self.first_lost + self.lost - 1} lost"
        return (f"{path}: damaged stretch at byte offset {self.start} ({self.bytes} bytes, "
                f"{what})")

    def to_dict(self) -> dict:
        return {"offset": self.start, "bytes": self.bytes, "first_lost_seq": self.first_lost,
                "records_lost": self.lost}


#: damaged stretches a reader lists one by one (and logs); those after are only counted
MAX_LISTED_DAMAGE = 100


class CaptureReader:
    """Read a capture file: its header, then records or raw chunks of records.

    ``records()`` yields one ``Record`` at a time (simple, a Python object
    per message).  ``chunks()`` yields ``(chunk, start_seq)`` with whole
    format-1 records only, for ``KiteDecoder.feed_capture`` (the batch path: no
    Python call per message); the sequence numbers of consecutive chunks jump
    over records lost to damage.  Either warns once if the file ends inside a
    record (``truncated`` is then True), and once per damaged stretch
    (``damaged``, ``damaged_bytes``, ``lost_records``; ``damage_found``), naming the file and
    the byte offset; ``damage`` lists the stretches (``Damage``, the first
    ``MAX_LISTED_DAMAGE``).

    ``until_damage``: stop at the first damaged stretch: the records before it are yielded,
    none after it; ``stopped_at`` is then that stretch and ``left_bytes`` what the file holds
    from its start on (not read).
    """

    def __init__(self, path: str | os.PathLike, chunk_size: int = 1 << 22, *,
                 until_damage: bool = False):
        self.path = os.fspath(path)
        self.chunk_size = chunk_size
        self.until_damage = until_damage
        self.damage: list[Damage] = []
        self.stopped_at: Damage | None = None
        self.left_bytes = 0
        #: damaged stretches met beyond the first MAX_LISTED_DAMAGE (counted, not listed)
        self.unlisted_damage = 0
        self.truncated = False
        self.truncated_bytes = 0
        self.damaged = 0
        self.damaged_bytes = 0
        self.lost_records = 0
        self.version = 2
        self._f: BinaryIO = open(self.path, "rb")
        try:
            self.header = self._read_header()
        except BaseException:
            self._f.close()
            raise
        self.data_offset = self._f.tell()

    @property
    def damage_found(self) -> bool:
        return bool(self.damaged or self.lost_records)

    def _read_header(self) -> CaptureHeader:
        head = self._f.read(12)
        if len(head) < 12 or head[:8] not in VERSIONS:
            raise CaptureError(f"{self.path}: not a capture file (expected magic {MAGIC.decode()} "
                               f"or {MAGIC_V1.decode()})")
        self.version = VERSIONS[head[:8]]
        (hlen,) = _HLEN.unpack_from(head, 8)
        if hlen > MAX_HEADER:
            raise CaptureError(f"{self.path}: capture header length {hlen} is implausible")
        raw = self._f.read(hlen)
        if len(raw) < hlen:
            raise CaptureError(f"{self.path}: capture header truncated ({len(raw)} of {hlen} bytes)")
        return CaptureHeader.from_json(raw)

    def scanner(self, max_payload: int = MAX_PAYLOAD) -> RecordScanner:
        """A ``RecordScanner`` for this file's records from the first one."""
        return RecordScanner(self.version, self.header.first_seq, max_payload)

    def first_recv_ns(self) -> int:
        """The first record's receive time (0 without a first record header)."""
        off = 12 if self.version == 2 else 0
        head = os.pread(self._f.fileno(), 8, self.data_offset + off)
        return int.from_bytes(head, "little") if len(head) == 8 else 0

    def chunks(self) -> Iterator[tuple[memoryview, int]]:
        """Yield ``(chunk, seq_of_first_record)``; each chunk holds whole format-1 records."""
        sc = self.scanner()
        # where the intact records stopped, and the sequence number expected there: a block
        # starting later in the file, or with a later number, has damage before it
        prev_end, expected = self.data_offset, self.header.first_seq

        def sync() -> None:
            self.damaged, self.damaged_bytes, self.lost_records = (sc.damaged, sc.damaged_bytes,
                                                                   sc.lost_records)

        for b in read_blocks(self._f, self.data_offset, sc, chunk_size=self.chunk_size):
            sync()
            if b.start != prev_end or b.first_seq != expected:
                d = self._note(Damage(prev_end, b.start, expected, b.first_seq - expected))
                if self.until_damage:
                    self._stop(d)
                    return
            yield b.data, b.first_seq
            prev_end, expected = b.end, b.first_seq + b.count
        sync()
        tail = os.fstat(self._f.fileno()).st_size - sc.truncated_bytes
        if prev_end < tail and (sc.damaged_bytes or sc.stopped):
            # damage up to the end of the file (or where format 1 stopped): nothing intact after
            d = self._note(Damage(prev_end, tail, expected, None))
            if self.until_damage:
                self._stop(d)
        if self.damage_found and self.stopped_at is None:
            log.warning("%s: %d damaged stretch(es) skipped (%d bytes, %d record(s) known lost)%s",
                        self.path, sc.damaged, sc.damaged_bytes, sc.lost_records,
                        ": format 1 cannot resynchronise, the rest of the file was not read"
                        if sc.stopped else "; the intact records after each were read")
        if sc.truncated_bytes and self.stopped_at is None:
            self.truncated = True
            self.truncated_bytes = sc.truncated_bytes
            log.warning("%s: last record truncated (%d bytes ignored); a crash while recording?",
                        self.path, sc.truncated_bytes)

    def _note(self, d: Damage) -> Damage:
        if len(self.damage) < MAX_LISTED_DAMAGE:
            self.damage.append(d)
            log.warning("%s", d.describe(self.path))
        else:
            if not self.unlisted_damage:
                log.warning("%s: more than %d damaged stretches: the rest are only counted",
                            self.path, MAX_LISTED_DAMAGE)
            self.unlisted_damage += 1
        return d

    def _stop(self, d: Damage) -> None:
        self.stopped_at = d
        self.left_bytes = os.fstat(self._f.fileno()).st_size - d.start
        # what was met of the file is this one stretch (the scanner may have read past it)
        self.damaged, self.damaged_bytes = 1, d.bytes
        self.lost_records = d.lost or 0
        log.warning("%s: stopped at the first damaged stretch (--until-damage): byte offset %d, "
                    "%d bytes from there not processed", self.path, d.start, self.left_bytes)

    def records(self) -> Iterator[Record]:
        for chunk, seq in self.chunks():
            for k, (pos, plen, recv_ns, kind) in enumerate(iter_records(chunk)):
                yield Record(seq + k, recv_ns, kind, bytes(chunk[pos:pos + plen]))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CaptureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
