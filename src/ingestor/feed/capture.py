"""Capture files (``.cap``): the raw broker stream, recorded and replayed.

Layout (DESIGN.md, "Capture file")::

    8 bytes  magic b"INGCAP01"
    4 bytes  uint32 LE header length H
    H bytes  UTF-8 JSON header: {"broker": ..., "stream": ..., "first_seq": ...}
    records to the end of the file:
      8 bytes u64 LE receive time (ns since the epoch, UTC)
      1 byte  kind: 1 binary WebSocket message, 2 text message
      4 bytes u32 LE payload length
      payload

Record k has sequence number ``first_seq + k``.  A truncated last record (a
crash while recording) is ignored with a warning.  Reading streams in
chunks, so files of any size are read in bounded memory.
"""

from __future__ import annotations

import json
import re
import logging
import os
import struct
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ingestor._core import capture_span

MAGIC = b"INGCAP01"
KIND_BINARY = 1
KIND_TEXT = 2
RECORD_HEADER = struct.Struct("<QBI")  # recv_ns, kind, length: 13 bytes
_HLEN = struct.Struct("<I")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 28  # a WebSocket message of 256 MiB is not a real one
#: sequence numbers stay far from int64's end (record k is first_seq + k)
MAX_FIRST_SEQ = 1 << 62
#: stream and broker names: they become file names (spool segments, dead letters) and
#: database keys, so no path separators, NULs or unbounded lengths
STREAM_NAME = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}")

log = logging.getLogger(__name__)


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
    to the OS; ``sync()`` also fsyncs.  Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, header: CaptureHeader | None = None,
                 buffer_size: int = 1 << 20):
        self.header = header or CaptureHeader()
        self.path = os.fspath(path)
        self._f: BinaryIO = open(self.path, "wb", buffering=buffer_size)
        raw = self.header.to_json()
        self._f.write(MAGIC + _HLEN.pack(len(raw)) + raw)
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
        self._f.write(RECORD_HEADER.pack(recv_ns, kind, n))
        self._f.write(payload)
        seq = self.next_seq
        self.records += 1
        self.bytes += RECORD_HEADER.size + n
        return seq

    def write_raw(self, records: bytes | bytearray | memoryview, count: int) -> None:
        """Append ``count`` whole records already in the record format (the spool's writer
        thread: one write for what the feed appended since the last one)."""
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


class CaptureReader:
    """Read a capture file: its header, then records or raw chunks of records.

    ``records()`` yields one ``Record`` at a time (simple, a Python object
    per message).  ``chunks()`` yields ``(chunk, start_seq)`` with whole
    records only, for ``KiteDecoder.feed_capture`` (the batch path: no
    Python call per message).  Either warns once if the file ends inside a
    record, and ``truncated`` is then True.
    """

    def __init__(self, path: str | os.PathLike, chunk_size: int = 1 << 22):
        self.path = os.fspath(path)
        self.chunk_size = chunk_size
        self.truncated = False
        self.truncated_bytes = 0
        self._f: BinaryIO = open(self.path, "rb")
        try:
            self.header = self._read_header()
        except BaseException:
            self._f.close()
            raise
        self.data_offset = self._f.tell()

    def _read_header(self) -> CaptureHeader:
        head = self._f.read(12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise CaptureError(f"{self.path}: not a capture file (expected magic {MAGIC.decode()})")
        (hlen,) = _HLEN.unpack_from(head, 8)
        if hlen > MAX_HEADER:
            raise CaptureError(f"{self.path}: capture header length {hlen} is implausible")
        raw = self._f.read(hlen)
        if len(raw) < hlen:
            raise CaptureError(f"{self.path}: capture header truncated ({len(raw)} of {hlen} bytes)")
        return CaptureHeader.from_json(raw)

    def _truncated_at(self, remaining: int) -> None:
        self.truncated = True
        self.truncated_bytes = remaining
        log.warning("%s: last record truncated (%d bytes ignored); a crash while recording?",
                    self.path, remaining)

    def chunks(self) -> Iterator[tuple[memoryview, int]]:
        """Yield ``(chunk, seq_of_first_record)``; each chunk holds whole records."""
        self._f.seek(self.data_offset)
        seq = self.header.first_seq
        carry = b""
        while True:
            data = self._f.read(self.chunk_size)
            if not data:
                break
            buf = carry + data if carry else data
            end, count = _whole_records(buf)
            if count == 0 and len(buf) < RECORD_HEADER.size + MAX_PAYLOAD:
                # One record larger than the chunk: keep reading.
                carry = buf
                continue
            if count:
                yield memoryview(buf)[:end], seq
                seq += count
            carry = buf[end:]
        if carry:
            self._truncated_at(len(carry))

    def records(self) -> Iterator[Record]:
        for chunk, seq in self.chunks():
            pos = 0
            n = len(chunk)
            while pos < n:
                recv_ns, kind, plen = RECORD_HEADER.unpack_from(chunk, pos)
                pos += RECORD_HEADER.size
                yield Record(seq, recv_ns, kind, bytes(chunk[pos:pos + plen]))
                pos += plen
                seq += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CaptureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _whole_records(buf) -> tuple[int, int]:
    """End offset and count of the whole records at the start of ``buf`` (walked in C)."""
    try:
        return capture_span(buf, MAX_PAYLOAD)
    except ValueError as exc:
        raise CaptureError(str(exc)) from None
