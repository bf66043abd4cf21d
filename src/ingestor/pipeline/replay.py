"""``ingestor replay``: a capture through the whole pipeline into the database.

The producer (decode -> aggregate -> encode, ``Pipeline``) runs in a worker
thread; the writer (``Writer``) runs on the event loop.  Between them a queue
of at most ``queue_batches`` batches: the producer blocks when the writer
falls behind (backpressure; memory stays bounded), and encodes the next batch
while the server ingests the previous one.

Exactly once: records at or below the stream's committed sequence number
are skipped, so replaying a capture twice leaves the tables as after the
first time.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass

from ingestor.pipeline import state
from ingestor.feed.capture import CaptureReader
from ingestor.pipeline import Pipeline, PipelineSettings
from ingestor.store.writer import Writer, postback_handler


def load_state(conn, pipeline: Pipeline) -> int:
    """Give the pipeline every known instrument id, each one's last tick and forming candles.

    See ``ingestor.pipeline.state.load_state``; returns the number of instruments seeded.
    """
    return state.load_state(conn, pipeline)


@dataclass
class ReplayResult:
    stream: str
    ticks: int
    candles: int
    snapshots: int
    batches: int
    skipped_messages: int
    dead_letters: int
    seconds: float
    stage_seconds: dict
    decoder: dict
    truncated_bytes: int

    @property
    def ticks_per_s(self) -> float:
        return self.ticks / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        st = self.stage_seconds
        out = [
            f"stream {self.stream}: {self.ticks:,} ticks, {self.candles:,} candles, "
            f"{self.snapshots:,} snapshots in {self.batches} transactions",
            f"{self.seconds:.2f} s: {self.ticks_per_s:,.0f} ticks/s",
            "stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items())
            + "  (decode/aggregate/encode in the producer thread, write overlapping them)",
        ]
        if self.skipped_messages:
            out.append(f"skipped {self.skipped_messages:,} messages already written (exactly once)")
        d = self.decoder
        bad = {k: d[k] for k in ("empty_message", "unknown_length", "truncated", "trailing_bytes",
                                 "bad_records") if d.get(k)}
        if bad:
            out.append("malformed (counted, skipped): "
                       + ", ".join(f"{k} {v}" for k, v in bad.items()))
        if self.truncated_bytes:
            out.append(f"truncated last record: {self.truncated_bytes} bytes ignored")
        if self.dead_letters:
            out.append(f"{self.dead_letters} batch(es) set aside to the dead-letter folder")
        return out


def replay(path: str, dsn: str, *, settings: PipelineSettings | None = None,
           queue_batches: int = 2, dead_letter_dir: str = "dead-letter",
           progress: bool | None = None, chunk_size: int = 1 << 22) -> ReplayResult:
    """Replay the capture at ``path`` into the database ``dsn`` (see the module docstring)."""
    from ingestor.store.dsn import connect
    from ingestor.store.instruments import register_tokens
    from ingestor.store.migrate import require_current
    from ingestor.store.offsets import committed

    reader = CaptureReader(path, chunk_size=chunk_size)
    setup = connect(dsn, autocommit=True)
    try:
        require_current(setup)
        stream = reader.header.stream
        pipeline = Pipeline(stream, resolve=lambda toks: register_tokens(setup, toks),
                            settings=settings, committed=committed(setup, stream))
        load_state(setup, pipeline)
        writer = Writer(dsn, dead_letter_dir=dead_letter_dir, on_texts=postback_handler())
        show = sys.stderr.isatty() if progress is None else progress
        t0 = time.perf_counter()
        asyncio.run(_run(reader, pipeline, writer, queue_batches, show))
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
        setup.close()
    if show:
        sys.stderr.write("\r\x1b[K")
    stages = dict(pipeline.timings)
    stages["write"] = writer.stats.write_seconds
    return ReplayResult(stream, writer.stats.ticks, writer.stats.candles, writer.stats.snapshots,
                        writer.stats.batches, pipeline.totals["skipped_messages"],
                        writer.stats.dead_letters, seconds, stages, pipeline.decoder.stats(),
                        reader.truncated_bytes)


async def _run(reader: CaptureReader, pipeline: Pipeline, writer: Writer, queue_batches: int,
               show: bool) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=queue_batches)
    stop = threading.Event()
    size = max(1, os.path.getsize(reader.path))

    def put(item) -> None:
        asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

    def produce() -> None:
        try:
            done = reader.data_offset
            for chunk, seq in reader.chunks():
                if stop.is_set():
                    return
                for batch in pipeline.feed_chunk(chunk, seq):
                    put(batch)
                done += len(chunk)
                if show:
                    sys.stderr.write(f"\rreplay {done / size:6.1%}  "
                                     f"{pipeline.totals['ticks']:,} ticks")
            put(pipeline.take(final=True))
            put(None)
        except BaseException as exc:  # hand it to the loop
            put(exc)

    await writer.connect()
    producer = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            await writer.write(item)
    finally:
        stop.set()
        while not producer.done():  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.01)
        await writer.close()
