"""One driver of the synchronous ``Pipeline``: for replay, the live daemon and crash recovery.

The pipeline (decode -> aggregate -> encode) knows nothing of time, sockets or
databases; the driver feeds it blocks of capture records from a source, runs
it in a worker thread (the core releases the GIL in its loops, so the event
loop keeps the other core), and puts the batches it makes on a bounded queue
that the writer empties.  The bounded queue is the backpressure: while the
database is away the writer retries, the queue fills, the driver waits, and
the source (the spool) grows instead.  This is nautilus_trader's split: a
synchronous engine tests drive directly, and a live layer around it.

Sources are blocks ``(stream, chunk, first_seq)``: whole capture records, the
record k of a block carrying sequence number ``first_seq + k``.  Sequence
numbers only grow within a stream, but may jump between blocks (a
distributed log's numbers have gaps): a batch commits the highest number it
covers, and anything at or below a stream's committed number is skipped.

* ``drive_capture``: a capture file (``ingestor replay``);
* ``drive_streams``: spool streams in order, leftovers of an earlier run
  first, then the live ones, waiting on the feed (no polling) and flushing
  at ``flush_interval`` while they are quiet (the daemon).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from typing import Awaitable, Callable, Iterable

from ingestor.pipeline.pipeline import FlushBatch, Pipeline

log = logging.getLogger(__name__)

#: receive times before this (2000-01-01 UTC) or more than ``MAX_AHEAD_NS`` after now are not
#: receive times: such a record is refused (the decoder's ``bad_time``), else it would pin its
#: instruments' times there (they only grow per instrument), across restarts
MIN_RECV_NS = 946_684_800 * 10**9
MAX_AHEAD_NS = 86_400 * 10**9


class Driver:
    """Feeds one ``Pipeline`` and puts its batches on ``out``.

    Parameters
    ----------
    pipeline : Pipeline
    out : asyncio.Queue
        Bounded: ``put`` waits while the writer is behind.
    executor : Executor, optional
        Where the pipeline runs (one thread at a time per pipeline).
    flush_interval, open_candle_interval : float, optional
        Live only: a batch at least every ``flush_interval`` seconds while
        anything is pending (tick-to-commit latency), the forming candles
        upserted every ``open_candle_interval``.  None: batches by size only
        (replay).
    """

    def __init__(self, pipeline: Pipeline, out: asyncio.Queue,
                 executor: concurrent.futures.Executor | None = None, *,
                 flush_interval: float | None = None, open_candle_interval: float = 1.0):
        self.pipeline = pipeline
        self.out = out
        self.executor = executor
        self.flush_interval = flush_interval
        self.open_candle_interval = open_candle_interval
        self._last_take = self._last_open = time.monotonic()

    async def _run(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _put(self, batch: FlushBatch) -> None:
        await self.out.put(batch)

    async def feed(self, stream: str, chunk, first_seq: int, committed: int = -1) -> None:
        """One block of records of ``stream`` (``committed``: the stream's committed number,
        used when the pipeline switches to it)."""
        pl = self.pipeline
        if pl.stream != stream:
            await self.switch(stream, committed)
        dec = pl.decoder
        dec.min_recv_ns = MIN_RECV_NS
        dec.max_recv_ns = time.time_ns() + MAX_AHEAD_NS
        for b in await self._run(lambda: list(pl.feed_chunk(chunk, first_seq))):
            await self._put(b)

    async def switch(self, stream: str, committed: int = -1) -> None:
        """Continue the same instruments on another stream: what is pending goes first."""
        pl = self.pipeline
        if pl.has_pending:
            await self._put(await self._run(pl.take))
        pl.new_stream(stream, committed)

    def due_in(self) -> float | None:
        """Seconds until the next timed flush (None: no timed flushes)."""
        if self.flush_interval is None:
            return None
        return max(0.0, self._last_take + self.flush_interval - time.monotonic())

    async def tick(self) -> None:
        """The timed flush, when due: close what ended by now, hand over what is pending."""
        if self.flush_interval is None:
            return
        now = time.monotonic()
        if now - self._last_take < self.flush_interval:
            return
        self._last_take = now
        pl = self.pipeline
        upsert_open = now - self._last_open >= self.open_candle_interval
        if not (pl.has_pending or pl.pending_rows or upsert_open):
            return
        if upsert_open:
            self._last_open = now
        now_us = time.time_ns() // 1000

        def step():
            pl.advance(now_us)
            return pl.take(open_candles=upsert_open)

        b = await self._run(step)
        if (b.n_ticks or b.n_candles or b.n_snapshots or b.texts or b.n_state or b.retracted
                or b.last_seq >= b.first_seq):
            await self._put(b)

    async def finish(self) -> None:
        """End of input: every forming candle and pending snapshot, then the last batch."""
        pl = self.pipeline
        await self._put(await self._run(lambda: pl.take(final=True)))


async def drive_capture(driver: Driver, reader, committed: int = -1,
                        progress: Callable[[int], None] | None = None) -> None:
    """A capture file through the driver (``CaptureReader``), then the final flush."""
    it = iter(reader.chunks())
    stream = reader.header.stream
    done = reader.data_offset
    size = os.path.getsize(reader.path)
    pl = driver.pipeline
    while (item := await driver._run(lambda: next(it, None))) is not None:
        chunk, seq = item
        read = done - reader.data_offset
        if read:  # rows still to come after this chunk, at the rate read so far
            seen = pl.totals["ticks"] + pl.totals["backfill_ticks"] + pl.pending_rows
            pl.rows_left = max(0, size - done - len(chunk)) * seen // read
        # the chunk is a view of the reader's buffer: decoded before the next read
        await driver.feed(stream, chunk, seq, committed)
        done += len(chunk)
        if progress is not None:
            progress(done)
    await driver.finish()


async def drive_streams(driver: Driver, streams: Callable[[], Iterable], wakeup: asyncio.Event,
                        stop: asyncio.Event, committed_of: Callable[[str], Awaitable[int]],
                        on_done: Callable[[object], None] | None = None,
                        linger: float = 0.01, linger_bytes: int = 1 << 20) -> None:
    """Spool streams in order (``streams()``: the current list, oldest first) until ``stop``
    is set and every stream is consumed; flushes on the driver's cadence meanwhile.

    ``committed_of(stream)``: a leftover stream's committed number (the database's);
    ``on_done(stream_spool)``: a stream was read to its end (its files go once committed).
    ``linger``: after a block, the next is taken once ``linger_bytes`` are waiting or
    ``linger`` seconds passed, so that a busy feed is handed over in blocks of many messages
    (one worker-thread call each) rather than one call per message.
    """
    last_feed = 0.0
    while True:
        wakeup.clear()
        progressed = False
        for sp in list(streams()):
            if driver.pipeline.stream != sp.stream and not sp.consumed:
                committed = -1
                if sp.recovered:
                    committed = await committed_of(sp.stream)
                    sp.skip_to(committed + 1)  # what is committed need not be read back
                await driver.switch(sp.stream, committed)
            wait = last_feed + linger - time.monotonic()
            if wait > 0 and not stop.is_set() and sp.waiting_bytes < linger_bytes:
                await asyncio.sleep(wait)
            got = sp.take()
            if got is None:
                if sp.consumed:  # read to its end (a leftover finds its end by reading)
                    if on_done is not None:
                        on_done(sp)
                    continue
                break  # the oldest stream has nothing yet: later ones must wait for it
            chunk, seq = got
            await driver.feed(sp.stream, chunk, seq)
            last_feed = time.monotonic()
            progressed = True
            break
        await driver.tick()
        if progressed:
            continue
        if stop.is_set() and all(sp.consumed for sp in streams()):
            break
        due = driver.due_in()
        try:
            await asyncio.wait_for(wakeup.wait(), timeout=due if due is not None else 1.0)
        except asyncio.TimeoutError:
            pass
    await driver.finish()
