"""``ingestor replay``: a capture through the whole pipeline into the database.

The capture goes through the same ``Driver`` as the live daemon: the pipeline
(decode -> aggregate -> encode) runs in a worker thread, the writer on the
event loop, and between them a queue of at most ``queue_batches`` batches:
the driver waits when the writer falls behind (backpressure; memory stays
bounded), and encodes the next batch while the server ingests the previous
one.

Exactly once: records at or below the stream's committed sequence number
are skipped, so replaying a capture twice leaves the tables as after the
first time.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ingestor.pipeline import state
from ingestor.feed.capture import CaptureError, CaptureReader
from ingestor.pipeline.driver import Driver, drive_capture
from ingestor.pipeline.pipeline import (BACKFILL_TOLERANCE_US, FlushBatch, Pipeline,
                                        PipelineSettings)
from ingestor.build import warn_debug_build
from ingestor.progress import EVERY, Progress
from ingestor.store.writer import Writer, postback_handler


def load_state(conn, pipeline: Pipeline) -> "state.Loaded":
    """Give the pipeline every known instrument id and each one's continuation state.

    See ``ingestor.pipeline.state.load_state``; returns what it seeded (``state.Loaded``).
    """
    return state.load_state(conn, pipeline)


class ReplayInterrupted(KeyboardInterrupt):
    """A replay stopped by SIGINT: what of ``stream`` the database holds (``committed``, its
    sequence number; -1: nothing), where it stood before (``before``), the ticks this run
    committed.  Replaying the capture again resumes after ``committed`` (exactly once)."""

    def __init__(self, path: str, stream: str, committed: int, before: int, ticks: int):
        super().__init__(path, stream, committed)
        self.path, self.stream, self.committed = path, stream, committed
        self.before, self.ticks = before, ticks

    def __str__(self) -> str:
        where = (f"stream {self.stream} committed up to sequence number {self.committed}"
                 if self.committed >= 0 else f"nothing of stream {self.stream} committed")
        return (f"{self.path}: interrupted: {where} ({self.ticks:,} ticks written by this run); "
                f"replaying it again resumes there")


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
    bad_tokens: int = 0
    #: tick rows COPYed straight into TimescaleDB's columnstore / into the rowstore
    columnstore_rows: int = 0
    rowstore_rows: int = 0
    #: damaged stretches of the capture skipped, their bytes, the records known lost in them
    damaged: int = 0
    damaged_bytes: int = 0
    lost_records: int = 0
    #: transactions written overlapped with the one before (``Writer.write_all``), and those
    #: rolled back and written again one at a time
    overlapped: int = 0
    overlap_retries: int = 0
    #: the stretches (``feed.capture.Damage``), those beyond the listed ones, and where an
    #: ``until_damage`` replay stopped with the bytes it left
    damage: list = field(default_factory=list)
    unlisted_damage: int = 0
    stopped_at: object = None
    left_bytes: int = 0
    #: ``order_book_depth20`` rows (Angel One's DEPTH packets)
    depth20: int = 0
    #: instruments this capture backfilled (its ticks of them older than the stored ones: kept
    #: their own times), their ticks inserted, and those already stored (the same key: skipped)
    backfill_instruments: int = 0
    backfill_ticks: int = 0
    backfill_stored: int = 0

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
        if self.overlapped or self.overlap_retries:
            out.append(f"transactions overlapped with the one before: {self.overlapped}"
                       + (f", {self.overlap_retries} rolled back and written again one at a "
                          f"time" if self.overlap_retries else ""))
        if self.columnstore_rows:
            out.append(f"ticks straight into the columnstore: {self.columnstore_rows:,}, "
                       f"into the rowstore: {self.rowstore_rows:,}")
        if self.backfill_instruments:
            out.append(f"backfill: {self.backfill_instruments:,} instrument(s) held newer ticks: "
                       f"{self.backfill_ticks:,} older ticks kept their own times, "
                       f"{self.backfill_stored:,} already stored (skipped), candles of the "
                       f"touched buckets recomputed")
        if self.skipped_messages:
            out.append(f"skipped {self.skipped_messages:,} messages already written (exactly once)")
        d = self.decoder
        bad = {k: d[k] for k in ("empty_message", "unknown_length", "truncated", "trailing_bytes",
                                 "bad_records", "unknown_mode", "short", "unknown_exchange",
                                 "bad_token", "out_of_range", "refused_token") if d.get(k)}
        if self.depth20:
            out.append(f"order_book_depth20: {self.depth20:,} rows (20-level books)")
        if d.get("bad_time"):
            out.append(f"{d['bad_time']:,} record(s) with a receive time outside 2000 .. now + "
                       f"1 day: refused and counted")
        if bad:
            out.append("malformed (counted, skipped): "
                       + ", ".join(f"{k} {v}" for k, v in bad.items()))
        if self.bad_tokens:
            out.append(f"{self.bad_tokens:,} packet(s) with instrument token 0 (no instrument "
                       f"can have it): counted and skipped")
        if self.damaged or self.lost_records:
            out.append(f"damaged: {self.damaged} stretch(es), {self.damaged_bytes} bytes, "
                       f"{self.lost_records} record(s) lost"
                       + (" (skipped; the intact records around them written)"
                          if self.stopped_at is None else ""))
        if self.truncated_bytes:
            out.append(f"truncated last record: {self.truncated_bytes} bytes ignored")
        if self.dead_letters:
            out.append(f"{self.dead_letters} batch(es) set aside to the dead-letter folder")
        return out


def replay(path: str, dsn: str, *, settings: PipelineSettings | None = None,
           queue_batches: int = 2, dead_letter_dir: str = "dead-letter",
           progress: bool | None = None, chunk_size: int = 1 << 22,
           direct_compress: bool = True, progress_every: float = EVERY,
           overlap: bool = True, until_damage: bool = False) -> ReplayResult:
    """Replay the capture at ``path`` into the database ``dsn`` (see the module docstring).

    A capture older than what the database holds for some of its instruments backfills them:
    their ticks keep their own times (``Pipeline``, "Backfill"; the tolerance is
    ``settings.backfill_tolerance_us``, ``BACKFILL_TOLERANCE_US`` when None).

    ``progress``: a bar on stderr (True), none (False), or None: a bar when stderr is a
    terminal, else a log line every ``progress_every`` seconds (``ingestor.progress``).
    ``until_damage``: stop at the capture's first damaged stretch (everything before it is
    committed; the result says where).

    Raises
    ------
    ReplayInterrupted
        On SIGINT (Ctrl-C): says what the database holds of the stream, where a second
        replay of the capture resumes.
    """
    from ingestor.store.dsn import connect
    from ingestor.store.instruments import register_tokens
    from ingestor.store.migrate import require_current
    from ingestor.store.offsets import committed

    # Replay never upserts forming candles mid-run (only its final flush writes them), so
    # every candle closed during the run was never stored: all go to the plain COPY.
    settings = replace(settings or PipelineSettings(), open_candle_min_us=1 << 62)
    if settings.backfill_tolerance_us is None:
        settings = replace(settings, backfill_tolerance_us=BACKFILL_TOLERANCE_US)
    reader = CaptureReader(path, chunk_size=chunk_size, until_damage=until_damage)
    setup = connect(dsn, autocommit=True)
    try:
        require_current(setup)
        stream = reader.header.stream
        done = committed(setup, stream)
        broker = reader.header.broker
        if broker not in ("kite", "angel"):
            raise CaptureError(f"{path}: broker {broker[:40]!r} is not supported (kite, angel)")
        pipeline = Pipeline(stream, resolve=lambda toks: register_tokens(setup, toks,
                                                                         broker=broker),
                            settings=settings, committed=done)
        pipeline.keep_latest = False  # no positions to mark to market here
        if broker == "angel":  # the header says whose frames: SmartStream's decoder, keyed by
            from ingestor.store.instruments import angel_decoder  # the registry

            pipeline.decoder = angel_decoder(setup)
        load_state(setup, pipeline)
        writer = Writer(dsn, dead_letter_dir=dead_letter_dir, on_texts=postback_handler(),
                        direct_compress=direct_compress, overlap=overlap)
        # the capture and the database are checked: the work starts (never before an error)
        warn_debug_build("ingestor replay")
        mode = None if progress is None else ("bar" if progress else "off")
        shown = Progress(f"replay {os.path.basename(path)}", max(1, os.path.getsize(path)),
                         start=reader.data_offset, mode=mode, every=progress_every)
        t0 = time.perf_counter()
        try:
            with shown:
                asyncio.run(_run(reader, pipeline, writer, queue_batches, shown, done))
        except KeyboardInterrupt:
            # what the database holds is the truth: a batch in flight was rolled back
            raise ReplayInterrupted(path, stream, committed(setup, stream), done,
                                    writer.stats.ticks) from None
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
        setup.close()
    stages = dict(pipeline.timings)
    stages["write"] = writer.stats.write_seconds
    return ReplayResult(stream, writer.stats.ticks + writer.stats.backfill_ticks,
                        writer.stats.candles, writer.stats.snapshots,
                        writer.stats.batches, pipeline.totals["skipped_messages"],
                        writer.stats.dead_letters, seconds, stages, pipeline.decoder.stats(),
                        reader.truncated_bytes, pipeline.totals["bad_tokens"],
                        writer.stats.direct_rows, writer.stats.rowstore_rows,
                        damaged=reader.damaged, damaged_bytes=reader.damaged_bytes,
                        lost_records=reader.lost_records, damage=list(reader.damage),
                        unlisted_damage=reader.unlisted_damage, stopped_at=reader.stopped_at,
                        left_bytes=reader.left_bytes, overlapped=writer.stats.overlapped,
                        overlap_retries=writer.stats.overlap_retries,
                        depth20=pipeline.totals["depth20"],
                        backfill_instruments=pipeline.totals["backfill_instruments"],
                        backfill_ticks=writer.stats.backfill_ticks,
                        backfill_stored=writer.stats.backfill_stored)


async def write_batches(queue: asyncio.Queue, writer: Writer,
                        on_written: Callable[[FlushBatch, str, float], None] | None = None) -> None:
    """The writer's side of a driver's queue, until it gets None: one transaction per batch
    (overlapping the next one's rows with it: ``Writer.write_all``)."""
    await writer.write_all(queue.get, on_written)


async def _run(reader: CaptureReader, pipeline: Pipeline, writer: Writer, queue_batches: int,
               shown: Progress, committed: int) -> None:
    queue: asyncio.Queue = asyncio.Queue(maxsize=queue_batches)
    driver = Driver(pipeline, queue)
    last = committed

    def progress(done: int) -> None:
        note = (f"committed {writer.stats.ticks:,} ticks, up to seq {last}"
                if last >= 0 else "nothing committed yet")
        shown.update(done, pipeline.totals["ticks"], note)

    def on_written(b: FlushBatch, outcome: str, seconds: float) -> None:
        nonlocal last
        last = max(last, b.last_seq)

    await writer.connect()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(write_batches(queue, writer, on_written), name="writer")

            async def produce() -> None:
                await drive_capture(driver, reader, committed, progress)
                # the end of input; on a failure or an interrupt (cancelled) the task group
                # cancels the writer instead: waiting here on a full queue would never end
                await queue.put(None)

            tg.create_task(produce(), name="pipeline")
    except BaseExceptionGroup as eg:
        # one failure is the story: re-raise it as itself (the CLI's one line)
        raise eg.exceptions[0] from None
    finally:
        await writer.close()
