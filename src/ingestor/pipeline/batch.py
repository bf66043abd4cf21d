"""The batch path: a capture file through ``KiteDecoder`` chunk by chunk.

``decode_capture`` reads a capture in large chunks and lets the decoder walk
the records in C (``KiteDecoder.feed_capture``): no Python call per message.
Each time the decoder's buffers fill, or a chunk is used up, the caller gets
the decoder back to drain ``ticks[:n_ticks]`` / ``depth[:n_depth]`` /
``texts[:n_texts]`` (text offsets refer to the chunk it is given); the
buffers are cleared when the caller asks for the next batch.  Memory is
bounded by the chunk size and the decoder's capacity, whatever the file size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from ingestor._core import KiteDecoder
from ingestor.feed.capture import CaptureReader


@dataclass
class Batch:
    decoder: KiteDecoder
    chunk: memoryview
    #: highest sequence number whose message is fully in this batch
    last_seq: int


def decode_capture(path: str | os.PathLike, decoder: KiteDecoder | None = None,
                   chunk_size: int = 1 << 22, reader: CaptureReader | None = None
                   ) -> Iterator[Batch]:
    """Yield decoded batches of a capture file (the decoder's buffers are reused).

    Consume each batch before asking for the next one: the next step clears
    the buffers.
    """
    dec = decoder if decoder is not None else KiteDecoder()
    own = reader is None
    rd = reader if reader is not None else CaptureReader(path, chunk_size=chunk_size)
    try:
        for chunk, seq in rd.chunks():
            pos = 0
            n = len(chunk)
            while pos < n:
                before = pos
                was_empty = not dec.n_ticks and not dec.n_texts
                pos, seq, full = dec.feed_capture(chunk, pos, seq)
                if not full:
                    break
                if pos == before and was_empty:
                    # Cannot happen: a message larger than the buffers grows them.
                    raise RuntimeError("decoder made no progress")
                yield Batch(dec, chunk, seq - 1)
                dec.clear()
            # Text offsets point into this chunk: hand over before the next one.
            yield Batch(dec, chunk, seq - 1)
            dec.clear()
    finally:
        if own:
            rd.close()
