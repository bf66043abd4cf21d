"""``ingestor run``: the daemon.

    feed (KiteFeed, one per connection) -> spool (raw messages, on disk first)
      -> pipeline (decode, aggregate, encode; worker thread) -> bounded queue
      -> writer (one transaction per batch, stream offsets) -> spool released

Everything the feed delivers is in the spool before it is processed, so the
feed never waits for the database: while the database is away the writer
retries, the queue fills, the pipeline stops reading the spool, and the spool
grows (bounded, alarmed); on recovery the pipeline drains it in order before
anything newer.  The stream offsets make every batch exactly once, across
retries, reconnections and restarts (a crash's spool is replayed at start).

SIGTERM/SIGINT: stop reading, drain the spool through the pipeline, flush
every forming candle, commit, exit 0 (within ``shutdown_timeout``, else exit
1 with the spool kept for the next start); a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime as dt
import logging
import os
import signal
import time

from ingestor.feed.capture import KIND_BINARY, KIND_TEXT
from ingestor.config import Config
from ingestor.feed.kite import KiteFeed
from ingestor.metrics import Metrics, serve
from ingestor.pipeline import Pipeline, PipelineSettings
from ingestor.feed.spool import Spool, StreamSpool
from ingestor.store.writer import Writer, postback_handler

log = logging.getLogger(__name__)

SQL_ACTIVE_TOKENS = "SELECT instrument_token FROM instruments WHERE is_active ORDER BY instrument_token"
SQL_GAP = ("INSERT INTO feed_gaps (connection, stream, started_at, ended_at, reason, tokens) "
           "VALUES (%s, %s, %s, %s, %s, %s)")


def _ts(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)


def settings_of(cfg: Config) -> PipelineSettings:
    from ingestor._core import timeframe_us

    p = cfg.pipeline
    return PipelineSettings(timeframes=tuple(p.timeframes), utc_offset=p.utc_offset, origin=p.origin,
                            snapshot_interval_us=int(p.snapshot_interval * 1e6),
                            flush_rows=p.flush_rows,
                            open_candle_min_us=timeframe_us(p.open_candles_from))


class Connection:
    """One feed connection: its feed client, its spool streams, its pipeline."""

    def __init__(self, label: str, tokens: dict[int, str], pipeline: Pipeline):
        self.label = label
        self.tokens = tokens
        self.pipeline = pipeline
        self.feed: KiteFeed | None = None
        #: spool streams in order; the pipeline reads the first, the feed appends to the last
        self.streams: collections.deque[StreamSpool] = collections.deque()
        self.gap_start: tuple[str, int, str] | None = None
        self.disconnected = True


class Daemon:
    def __init__(self, cfg: Config, dsn: str, url: str, api_key: str, access_token: str,
                 tokens: dict[int, str], setup_conn):
        self.cfg = cfg
        self.dsn = dsn
        self.url = url
        self.api_key = api_key
        self.access_token = access_token
        self.metrics = Metrics()
        self.spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.alarm_at,
                           cfg.spool.segment_bytes, keep_dir=cfg.record.dir)
        self.setup = setup_conn
        self.stop = asyncio.Event()
        self.stopping_since: float | None = None
        self.writer = Writer(dsn, dead_letter_dir=cfg.writer.dead_letter_dir,
                             max_rejects=cfg.writer.max_rejects, retry_for=None,
                             on_texts=self._postbacks)
        self._on_texts = postback_handler()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.writer.queue_batches)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pipeline")
        self.committed: dict[str, int] = {}
        self.gaps: list = []
        self.loop_lag_max = 0.0
        settings = settings_of(cfg)
        per = cfg.feed.tokens_per_connection
        items = sorted(tokens.items())
        self.connections = []
        from ingestor.pipeline.state import load_state

        for i in range(0, len(items), per):
            label = f"kite-{len(self.connections)}"
            pl = Pipeline(f"{label}-idle", resolve=self._resolve, settings=settings)
            mine = dict(items[i:i + per])
            # each engine continues only its connection's instruments: another's pending
            # candles and books are not its to write at shutdown
            load_state(setup_conn, pl, tokens=mine)
            self.connections.append(Connection(label, mine, pl))

    # -- feed side (event loop) ----------------------------------------------

    def _on_connect(self, conn: Connection, stream: str) -> None:
        now = time.time_ns()
        conn.streams.append(self.spool.stream(stream))
        conn.disconnected = False
        self.metrics.feed_connected.labels(conn.label).set(1)
        if conn.gap_start is not None:
            old_stream, started, reason = conn.gap_start
            self.gaps.append((conn.label, old_stream, _ts(started), _ts(now), reason,
                              sorted(conn.tokens)))
            conn.gap_start = None

    def _on_disconnect(self, conn: Connection, stream: str, started_ns: int, reason: str) -> None:
        if conn.gap_start is None:
            conn.gap_start = (stream, time.time_ns(), reason)
        conn.disconnected = True
        self.metrics.feed_connected.labels(conn.label).set(0)
        self.metrics.reconnects.labels(conn.label).inc()

    def _on_message(self, conn: Connection, stream: str, payload: bytes, is_text: bool,
                    recv_ns: int) -> None:
        sp = conn.streams[-1]
        seq = sp.append(payload, KIND_TEXT if is_text else KIND_BINARY, recv_ns)
        self.metrics.messages.labels(conn.label, "text" if is_text else "binary").inc()

    # -- pipeline side -------------------------------------------------------

    def _resolve(self, tokens: list[int]) -> dict[int, int]:
        """Instrument ids of new tokens (worker thread): retried while the database is away."""
        from ingestor.store.dsn import connect
        from ingestor.store.instruments import register_tokens

        delay = 0.2
        while True:
            try:
                with connect(self.dsn, autocommit=True) as c:
                    return register_tokens(c, tokens)
            except Exception as exc:  # noqa: BLE001 - the database is away: wait for it
                if self.stop.is_set():
                    raise RuntimeError("stopping with new instruments unregistered: the spool "
                                       "keeps their messages for the next start") from None
                log.warning("cannot register %d new instrument(s) yet: %s", len(tokens), exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _consume(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        pl = conn.pipeline
        interval = self.cfg.pipeline.flush_interval
        open_every = self.cfg.pipeline.open_candle_interval
        last_take = last_open = time.monotonic()
        while True:
            progressed = False
            if conn.streams:
                sp = conn.streams[0]
                got = sp.read()
                if got is not None:
                    chunk, seq = got
                    if pl.stream != sp.stream:
                        if pl.has_pending:
                            await self.queue.put(await loop.run_in_executor(self.pool, pl.take))
                        pl.new_stream(sp.stream)
                    batches = await loop.run_in_executor(
                        self.pool, lambda: list(pl.feed_chunk(chunk, seq)))
                    for b in batches:
                        await self.queue.put(b)
                    progressed = True
                elif len(conn.streams) > 1 or (self.stop.is_set() and conn.disconnected):
                    # this stream ended and is read to its end
                    if len(conn.streams) > 1:
                        conn.streams.popleft()
                        self._retire(sp)
                        continue
            now = time.monotonic()
            if self.stop.is_set() and not progressed and conn.disconnected:
                break
            if now - last_take >= interval:
                last_take = now
                upsert_open = now - last_open >= open_every
                if pl.has_pending or pl.pending_rows or upsert_open:
                    now_us = time.time_ns() // 1000
                    if upsert_open:
                        last_open = now

                    def tick():
                        pl.advance(now_us)
                        return pl.take(open_candles=upsert_open)
                    b = await loop.run_in_executor(self.pool, tick)
                    if b.n_ticks or b.n_candles or b.n_snapshots or b.texts or b.last_seq >= b.first_seq:
                        await self.queue.put(b)
            if not progressed:
                await asyncio.sleep(0.02)
        final = await loop.run_in_executor(self.pool, lambda: pl.take(final=True))
        await self.queue.put(final)
        for sp in list(conn.streams):
            self._retire(sp)
        conn.streams.clear()

    def _retire(self, sp: StreamSpool) -> None:
        self._retiring.append(sp)

    # -- writer side ---------------------------------------------------------

    async def _write(self) -> None:
        m = self.metrics
        while True:
            b = await self.queue.get()
            if b is None:
                break
            t0 = time.perf_counter()
            outcome = await self.writer.write(b)
            m.batches.labels(outcome).inc()
            m.flush_latency.observe(time.perf_counter() - t0)
            if outcome == "written":
                m.ticks_written.inc(b.n_ticks)
                m.candles_written.inc(b.n_candles)
                m.snapshots_written.inc(b.n_snapshots)
                if b.first_recv_ns:
                    # the batch's oldest tick: the longest any of its ticks waited
                    lat = (time.time_ns() - b.first_recv_ns) / 1e9
                    m.tick_to_commit.observe(lat)
            self.committed[b.stream] = max(self.committed.get(b.stream, -1), b.last_seq)
            self._release()

    def _release(self) -> None:
        for conn in self.connections:
            for sp in conn.streams:
                c = self.committed.get(sp.stream)
                if c is not None:
                    sp.release(c)
        keep = []
        for sp in self._retiring:
            c = self.committed.get(sp.stream, -1)
            if c >= sp.next_seq - 1:
                sp.close(c)
            else:
                keep.append(sp)
        self._retiring = keep
        self.metrics.spool_bytes.set(self.spool.bytes)
        self.metrics.spool_dropped.set(self.spool.dropped)
        self.metrics.spool_alarm.set(1 if self.spool.alarmed else 0)

    async def _gaps(self) -> None:
        """Record feed gaps (own connection, retried)."""
        import psycopg

        while not (self.stop.is_set() and not self.gaps):
            if self.gaps:
                try:
                    async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                        while self.gaps:
                            await c.execute(SQL_GAP, self.gaps[0])
                            self.gaps.pop(0)
                except Exception as exc:  # noqa: BLE001 - retried
                    log.warning("cannot record feed gap yet: %s", exc)
            await asyncio.sleep(0.5)

    async def _postbacks(self, conn, batch) -> None:
        self.metrics.postbacks.inc(len(batch.texts))
        await self._on_texts(conn, batch)

    async def _mark_to_market(self) -> None:
        """Positions marked to the latest prices every second: one statement, no tick query."""
        import psycopg

        from ingestor.orders.store import amark_to_market

        conn = None
        while not self.stop.is_set():
            await asyncio.sleep(self.cfg.pipeline.mark_interval)
            prices: dict = {}
            for c in self.connections:
                prices.update(c.pipeline.latest_prices())
            if not prices:
                continue
            try:
                if conn is None or conn.closed:
                    conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                await amark_to_market(conn, prices)
            except Exception as exc:  # noqa: BLE001 - retried at the next cadence
                log.debug("mark to market skipped: %s", exc)
                conn = None
        if conn is not None:
            await conn.close()

    # -- housekeeping --------------------------------------------------------

    async def _monitor(self) -> None:
        loop = asyncio.get_running_loop()
        last_sync = time.monotonic()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - t0 - 0.1)
            self.metrics.loop_lag.set(lag)
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
                self.metrics.loop_lag_max.set(lag)
            self._decoder_metrics()
            now_ns = time.time_ns()
            for conn in self.connections:
                if conn.feed is not None and conn.feed.stats.last_message_ns:
                    self.metrics.feed_lag.labels(conn.label).set((now_ns - conn.feed.stats.last_message_ns) / 1e9)
            self.metrics.db_up.set(1 if self.writer.up else 0)
            if time.monotonic() - last_sync >= self.cfg.spool.fsync_interval:
                last_sync = time.monotonic()
                try:
                    await self._fsync(loop)
                except OSError as exc:
                    log.error("spool fsync failed: %s", exc)
            if self.stop.is_set() and self.queue.empty() and all(
                    not c.streams for c in self.connections):
                return

    async def _fsync(self, loop) -> None:
        """fsync the open spool segments off the loop (on duplicated descriptors, so a
        segment the loop rotates or closes meanwhile cannot pull the fd from under it)."""
        fds = []
        for c in self.connections:
            if c.streams and c.streams[-1].segments:
                seg = c.streams[-1].segments[-1]
                if not seg.closed:
                    fds.append(os.dup(seg.writer._f.fileno()))

        def sync():
            for fd in fds:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        if fds:
            await loop.run_in_executor(None, sync)

    _seen: dict = {}

    def _decoder_metrics(self) -> None:
        """Decoder counters (per connection's pipeline) into the Prometheus counters."""
        totals: dict = {}
        for c in self.connections:
            for k, v in c.pipeline.decoder.stats().items():
                totals[k] = totals.get(k, 0) + v
        seen = self._seen
        m = self.metrics
        d = totals.get("packets", 0) - seen.get("packets", 0)
        if d > 0:
            m.ticks_decoded.inc(d)
        for reason in ("empty_message", "unknown_length", "truncated", "trailing_bytes", "bad_records"):
            d = totals.get(reason, 0) - seen.get(reason, 0)
            if d > 0:
                m.malformed.labels(reason).inc(d)
        self._seen = totals

    def health(self) -> tuple[bool, dict]:
        feeds = {c.label: bool(c.feed and c.feed.stats.connected) for c in self.connections}
        db = self.writer.up and self.failed is None
        ok = all(feeds.values()) and db and not self.spool.alarmed
        return ok, {"feeds": feeds, "database": self.writer.up, "spool_bytes": self.spool.bytes,
                    "spool_alarm": self.spool.alarmed, "failed": self.failed}

    # -- main ----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._retiring: list[StreamSpool] = []
        signals = []

        def on_signal(signame):
            if self.stop.is_set():
                log.error("second %s: exiting at once (the spool keeps what was not committed)", signame)
                os._exit(1)
            log.info("%s: stopping: draining the spool, flushing candles, committing", signame)
            self.stopping_since = time.monotonic()
            self.stop.set()
            for c in self.connections:
                if c.feed is not None:
                    asyncio.ensure_future(c.feed.close())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
            signals.append(sig)
        server = None
        if self.cfg.metrics.listen:
            host, _, port = self.cfg.metrics.listen.rpartition(":")
            server = await serve(host or "127.0.0.1", int(port), self.metrics, self.health)
            log.info("metrics on http://%s/metrics", self.cfg.metrics.listen)
        f = self.cfg.feed
        tasks = []
        for conn in self.connections:
            conn.feed = KiteFeed(
                conn.label, self.url, self.api_key, self.access_token, conn.tokens,
                on_message=lambda s, p, t, r, c=conn: self._on_message(c, s, p, t, r),
                on_connect=lambda s, c=conn: self._on_connect(c, s),
                on_disconnect=lambda s, st, why, c=conn: self._on_disconnect(c, s, st, why),
                heartbeat_timeout=f.heartbeat_timeout, reconnect_min=f.reconnect_min,
                reconnect_max=f.reconnect_max, rejected_retry=f.rejected_retry,
                connect_timeout=f.connect_timeout)
            tasks.append(asyncio.ensure_future(conn.feed.run(self.stop)))
        consumers = [asyncio.ensure_future(self._consume(c)) for c in self.connections]
        writer = asyncio.ensure_future(self._write())
        side = [asyncio.ensure_future(self._gaps()), asyncio.ensure_future(self._monitor()),
                asyncio.ensure_future(self._mark_to_market())]
        for name, t in ([("feed", t) for t in tasks] + [("pipeline", t) for t in consumers]
                        + [("writer", writer), ("gaps", side[0]), ("monitor", side[1])]):
            t.add_done_callback(lambda t, name=name: self._task_done(name, t))
        log.info("running: %d connection(s), %d tokens", len(self.connections),
                 sum(len(c.tokens) for c in self.connections))
        await self.stop.wait()
        budget = self.cfg.shutdown_timeout
        now = time.time_ns()
        for c in self.connections:
            if c.gap_start is not None:  # stopped while disconnected: the gap ends here
                stream, started, reason = c.gap_start
                self.gaps.append((c.label, stream, _ts(started), _ts(now),
                                  f"{reason}; daemon stopped", sorted(c.tokens)))
                c.gap_start = None
        try:
            # (a task that failed was reported by _task_done: waited for, not re-raised)
            await asyncio.wait(tasks, timeout=5)
            for c in self.connections:
                c.disconnected = True

            def left() -> float:
                return max(1.0, budget - (time.monotonic() - self.stopping_since))

            _, pending = await asyncio.wait(consumers, timeout=left())
            if pending:
                raise asyncio.TimeoutError
            if not writer.done():
                await asyncio.wait_for(self.queue.put(None), timeout=left())
                await asyncio.wait([writer], timeout=left())
                if not writer.done():
                    raise asyncio.TimeoutError
            self._release()
        except asyncio.TimeoutError:
            log.error("shutdown took longer than %.0f s; exiting with the spool kept (%d bytes) "
                      "for the next start", budget, self.spool.bytes)
            for t in tasks + consumers + [writer]:
                t.cancel()
            return 1
        finally:
            if self.gaps:
                try:
                    await asyncio.wait_for(side[0], timeout=5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - logged by _gaps
                    log.error("%d feed gap(s) could not be recorded", len(self.gaps))
            for t in side:
                t.cancel()
            if server is not None:
                server.close()
            await self.writer.close()
            self.pool.shutdown(wait=False)
        s = self.writer.stats
        log.info("stopped: %d ticks, %d candles, %d snapshots in %d transactions", s.ticks,
                 s.candles, s.snapshots, s.batches)
        return 1 if self.failed else 0

    failed: str | None = None

    def _task_done(self, name: str, task: asyncio.Task) -> None:
        """A task of the daemon ended: if by an error, say so and stop (nothing is lost:
        what is not committed stays in the spool for the next start)."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self.failed is None:
            self.failed = f"{name}: {type(exc).__name__}: {exc}"
        log.error("the %s task failed (%s: %s); stopping, the spool keeps what was not "
                  "committed", name, type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        if not self.stop.is_set():
            self.stopping_since = time.monotonic()
            self.stop.set()
            for c in self.connections:
                if c.feed is not None:
                    asyncio.ensure_future(c.feed.close())
