"""``ingestor run``: the daemon.

    feed (KiteFeed or SmartStreamFeed, one per connection) -> spool (write-ahead log: memory
      + disk; each stream's capture header names its broker)
      -> Driver (pipeline in a worker thread: decode, aggregate, encode)
      -> bounded queue -> writer (one transaction per batch, stream offsets)
      -> spool released

Every message is appended to the spool as it arrives and handed to the
pipeline from memory; the spool's own thread writes it to disk.  The feed
never waits for the database: while the database is away the writer retries,
the queue fills, the driver waits, the spool's memory tail overflows to disk
only, and on recovery the driver reads the backlog back in order before
anything newer.  The stream offsets make every batch exactly once, across
retries, reconnections and restarts.

Start-up needs neither the database nor the feed: the feeds connect (and
retry, as after a drop) and spool at once; the pipeline waits for the
database, checks the schema, replays what an earlier run left in the spool
(a crash, a stop with the database away) and then takes the live streams.
The instruments to subscribe come from the configuration, else the
database's active instruments, else the set the last run subscribed (kept
beside the spool), else it is an error.

SIGTERM/SIGINT: stop reading, drain the spool through the pipeline, flush
every forming candle, commit, exit 0 (within ``shutdown_timeout``, else exit
1 with the spool kept for the next start).  The same signal again within
``SIGNAL_REPEAT`` seconds is the same request (``timeout`` and process
managers send more than one); a later one exits at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from ingestor.config import Config, FeedConfig, per_connection
from ingestor.errors import SchemaNotCurrent
from ingestor.feed.capture import KIND_BINARY, KIND_TEXT
from ingestor.feed.kite import KiteFeed
from ingestor.feed.spool import Spool, StreamSpool
from ingestor.metrics import Metrics, serve
from ingestor.pipeline.driver import Driver, drive_streams
from ingestor.pipeline.pipeline import FlushBatch, Pipeline, PipelineSettings
from ingestor.sdnotify import Notifier
from ingestor.store.writer import Writer, postback_handler

log = logging.getLogger(__name__)

# (a token the engine cannot key, 0 or 2^32 and over, is no instrument: ``load_ids``)
SQL_ACTIVE_TOKENS = ("SELECT instrument_token FROM instruments WHERE is_active AND broker = 'kite' "
                     "AND instrument_token > 0 AND instrument_token < 4294967296 "
                     "ORDER BY instrument_token")
SQL_ACTIVE_ANGEL = ("SELECT exchange_type, broker_token FROM instruments WHERE is_active "
                    "AND broker = 'angel' ORDER BY exchange_type, broker_token")
SQL_GAP = ("INSERT INTO feed_gaps (connection, stream, started_at, ended_at, reason, tokens) "
           "VALUES (%s, %s, %s, %s, %s, %s)")
#: an Angel One connection's gap: its subscriptions' engine keys looked up in the registry
#: as the row is written (a feed process has no decoder to ask, nor has a daemon whose
#: pipeline has not met the tokens yet)
SQL_GAP_ANGEL = (
    "INSERT INTO feed_gaps (connection, stream, started_at, ended_at, reason, tokens) "
    "SELECT %s, %s, %s, %s, %s, (SELECT coalesce(array_agg(i.instrument_token ORDER BY "
    "i.instrument_token), '{}') FROM instruments i, unnest(%s::smallint[], %s::text[]) "
    "AS s(etype, token) WHERE i.broker = 'angel' AND i.exchange_type = s.etype "
    "AND i.broker_token = s.token)")


class AngelSubscriptions(tuple):
    """An Angel One connection's ``(exchange type, token)`` pairs, for ``feed_gaps.tokens``:
    written as the registry's engine keys (:data:`SQL_GAP_ANGEL`)."""


def gap_row_sql(gap: tuple) -> tuple[str, tuple]:
    """The statement and parameters recording ``gap`` (``Daemon.gaps``' rows)."""
    *head, tokens = gap
    if isinstance(tokens, AngelSubscriptions):
        return SQL_GAP_ANGEL, (*head, [e for e, _ in tokens], [t for _, t in tokens])
    return SQL_GAP, gap
#: connection errors that waiting will not cure (the server answered: the DSN is wrong)
_NOT_TRANSIENT = ("authentication failed", "does not exist", "no pg_hba.conf entry",
                  "permission denied")
#: seconds within which a repeated stop signal is the same request
SIGNAL_REPEAT = 2.0
#: the last subscribed set, kept beside the spool (subscribing without the database)
SUBSCRIPTIONS_FILE = "subscriptions.json"


def _ts(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)


def settings_of(cfg: Config) -> PipelineSettings:
    from ingestor._core import timeframe_us

    p = cfg.pipeline
    return PipelineSettings(timeframes=tuple(p.timeframes), utc_offset=p.utc_offset, origin=p.origin,
                            snapshot_interval_us=int(p.snapshot_interval * 1e6),
                            flush_rows=p.flush_rows,
                            open_candle_min_us=timeframe_us(p.open_candles_from),
                            dense_rows=cfg.writer.direct_min_rows)


def save_subscriptions(spool_dir: str, feeds: dict[str, dict]) -> None:
    """Each feed's subscribed set, beside the spool (what to subscribe without the database):
    Kite tokens as numbers, Angel One's (exchange type, token) as ``"1:3045"``."""
    from ingestor.config import angel_key_text

    os.makedirs(spool_dir, exist_ok=True)
    path = os.path.join(spool_dir, SUBSCRIPTIONS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({name: {angel_key_text(t) if isinstance(t, tuple) else str(t): m
                          for t, m in sorted(toks.items())}
                   for name, toks in feeds.items()}, f)
    os.replace(tmp, path)


def _subscription_key(text: str):
    """A saved token: an int (Kite), an (exchange type, token) pair (Angel One), else None."""
    from ingestor.config import angel_key

    if text.isdigit():
        return int(text) if 0 < int(text) < 1 << 32 else None
    try:
        return angel_key(text)
    except ValueError:
        return None


def load_subscriptions(spool_dir: str) -> dict[str, dict] | None:
    """What :func:`save_subscriptions` kept (entries that do not check out are left out)."""
    from ingestor.config import ANGEL_MODES

    try:
        with open(os.path.join(spool_dir, SUBSCRIPTIONS_FILE), "rb") as f:
            raw = json.loads(f.read(16 << 20))
        out = {}
        for name, toks in raw.items():
            if not isinstance(toks, dict):
                continue
            keys = ((_subscription_key(str(t)), m) for t, m in toks.items())
            out[str(name)] = {k: str(m) for k, m in keys
                              if k is not None and m in ANGEL_MODES
                              and (isinstance(k, tuple) or m in ("ltp", "quote", "full"))}
        return out
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


@dataclass
class FeedPlan:
    """One configured feed, ready to run: its settings, credentials and subscriptions."""

    feed: FeedConfig
    api_key: str
    #: Kite's access token; Angel One's JWT
    access_token: str
    #: Kite: {token: mode}; Angel One: {(exchange type, token): mode}
    tokens: dict
    #: Angel One: the client code and the feed token
    client_code: str = ""
    feed_token: str = ""
    #: Angel One: () -> (jwt, feed_token) read again (the credentials file) before a reconnect
    refresh: object = None

    @property
    def broker(self) -> str:
        return self.feed.broker


class SideConnection:
    """The daemon's one connection for its side work (feed gaps, marks to market, offsets of
    leftover streams), shared by those tasks and reconnected on demand.  With the writer's
    own connection and the pipeline thread's, these are the daemon's three database
    connections, each with one owner."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn = None
        self.lock = asyncio.Lock()

    async def run(self, fn):
        """``await fn(conn)`` on the connection (opened if needed; dropped if it failed)."""
        import psycopg

        async with self.lock:
            if self.conn is None or self.conn.closed:
                self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                                  connect_timeout=10)
            try:
                return await fn(self.conn)
            except psycopg.OperationalError:
                await self.close()
                raise

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.conn = None


class Connection:
    """One feed connection: its feed client, its spool streams (oldest first), its driver."""

    def __init__(self, label: str, tokens: dict, plan: FeedPlan):
        self.label = label
        self.tokens = tokens
        self.plan = plan
        self.feed: KiteFeed | None = None
        self.streams: list[StreamSpool] = []
        self.wakeup = asyncio.Event()
        self.driver: Driver | None = None
        self.gap_start: tuple[str, int, str] | None = None
        self.n_binary = 0
        self.n_text = 0

    def gap_tokens(self) -> list[int] | AngelSubscriptions:
        """The connection's subscriptions, for ``feed_gaps.tokens``: Kite's tokens; Angel
        One's ``(exchange type, token)`` pairs, which become the registry's engine keys as
        the gap is written (:func:`gap_row_sql`)."""
        if self.plan.broker != "angel":
            return sorted(self.tokens)
        return AngelSubscriptions(sorted(self.tokens))


class Daemon:
    def __init__(self, cfg: Config, dsn: str, plans: list[FeedPlan], spool: Spool):
        """``spool``: opened and locked by the caller (one daemon per folder)."""
        self.cfg = cfg
        self.dsn = dsn
        self.metrics = Metrics(sessions=cfg.sessions)
        self.spool = spool
        self.stop = asyncio.Event()
        self.stopping_since: float | None = None
        self.writer = Writer(dsn, dead_letter_dir=cfg.writer.dead_letter_dir,
                             max_rejects=cfg.writer.max_rejects, retry_for=None,
                             on_texts=self._postbacks, metrics=self.metrics,
                             direct_compress=cfg.writer.direct_compress,
                             overlap=cfg.writer.overlap)
        self._on_texts = postback_handler()
        #: each batch's postback result until its transaction commits (retries overwrite it)
        self._postback_results: dict[int, object] = {}
        self.postback_dead_letters = 0
        self.last_postback_dead_letter: str | None = None
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.writer.queue_batches)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pipeline")
        self.settings = settings_of(cfg)
        self.gaps: list = []
        self.loop_lag_max = 0.0
        self.failed: str | None = None
        #: False until the database answered and the schema checked (start-up)
        self.pipeline_ready = False
        #: every pipeline this run made (recovery and live): the decoder counters' source
        self.pipelines: list[Pipeline] = []
        self.by_stream: dict[str, StreamSpool] = {}
        self.side = SideConnection(dsn)
        #: the pipeline thread's connection (instrument registration), reconnected on demand
        self._resolve_conn = None
        #: the pipelines (two worker threads) take turns on that connection
        self._resolve_lock = threading.Lock()
        #: each feed's tokens over its connections (labels <feed name>-<n>)
        self.connections = []
        for plan in plans:
            per = per_connection(plan.feed)
            items = sorted(plan.tokens.items())
            self.connections += [Connection(f"{plan.feed.name}-{i // per}",
                                            dict(items[i:i + per]), plan)
                                 for i in range(0, len(items), per)]
        #: streams an earlier run left (taken before any new stream exists in the folder)
        self.leftovers = self.spool.leftovers()
        self.metrics.attach(self)
        for c in self.connections:  # every series exists from the start
            self.metrics.feed_connected.labels(c.label).set(0)
            self.metrics.reconnects.labels(c.label)
            self.metrics.feed_lag.labels(c.label)
        self.metrics.db_up.set(0)
        #: systemd's readiness protocol (nothing without $NOTIFY_SOCKET): see _notify_state
        self.notifier = Notifier()
        self._watchdog_due = 0.0

    # -- feed side (event loop) ----------------------------------------------

    def _on_connect(self, conn: Connection, stream: str) -> None:
        now = time.time_ns()
        if conn.streams and not conn.streams[-1].ended:
            conn.streams[-1].end()
        sp = self.spool.stream(stream, broker=conn.plan.broker)
        sp.wakeup = self._waker(conn)
        conn.streams.append(sp)
        self.by_stream[stream] = sp
        self.metrics.feed_connected.labels(conn.label).set(1)
        if conn.gap_start is not None:
            old_stream, started, reason = conn.gap_start
            self.gaps.append((conn.label, old_stream, _ts(started), _ts(now), reason,
                              conn.gap_tokens()))
            conn.gap_start = None

    def _waker(self, conn: Connection):
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        ev = conn.wakeup

        def wake() -> None:
            # the feed appends on the loop; the spool's thread wakes it from elsewhere
            if threading.get_ident() == loop_thread:
                if not ev.is_set():
                    ev.set()
            else:
                loop.call_soon_threadsafe(ev.set)
        return wake

    def _on_disconnect(self, conn: Connection, stream: str, started_ns: int, reason: str) -> None:
        if conn.gap_start is None:
            conn.gap_start = (stream, time.time_ns(), reason)
        if conn.streams and conn.streams[-1].stream == stream:
            conn.streams[-1].end()
        self.metrics.feed_connected.labels(conn.label).set(0)
        self.metrics.reconnects.labels(conn.label).inc()

    def _on_message(self, conn: Connection, stream: str, payload: bytes, is_text: bool,
                    recv_ns: int) -> None:
        if is_text:
            conn.n_text += 1
            conn.streams[-1].append(payload, KIND_TEXT, recv_ns)
        else:
            conn.n_binary += 1
            conn.streams[-1].append(payload, KIND_BINARY, recv_ns)

    # -- pipeline side -------------------------------------------------------

    def _resolve(self, tokens: list[int], broker: str = "kite") -> dict[int, int]:
        """Instrument ids of new tokens (worker thread): retried while the database is away
        (:meth:`_registry`).  Angel One's keys were registered when the decoder met their
        tokens (:meth:`_register_angel`): their ids are read."""
        from ingestor.store.instruments import register_tokens

        return self._registry(lambda conn: register_tokens(conn, tokens, broker=broker),
                              f"{len(tokens)} new instrument(s)")

    def _register_angel(self, exchange_type: int, token: str) -> int:
        """The engine key of an Angel One token the decoder first met (worker thread, the
        decoder's resolver): registered if unknown, retried while the database is away."""
        from ingestor.store.instruments import register_angel

        return self._registry(lambda conn: register_angel(conn, exchange_type, token),
                              "a new Angel One instrument")

    def _registry(self, fn, what: str):
        """``fn(conn)`` on the pipeline thread's connection: retried while the database is away.

        Only a lost or refused connection is retried (``store.errors.classify``; a reconnection
        the server did not answer, where the connection had to be opened again); anything
        else -- a missing privilege, a broken schema -- is raised: the pipeline task fails,
        the daemon says why and exits 1, and the spool keeps the messages for the next start.
        """
        import psycopg
        import stamina

        from ingestor.errors import DatabaseUnavailable
        from ingestor.store.dsn import connect
        from ingestor.store.errors import classify

        def away(exc: Exception) -> bool:
            if isinstance(exc, DatabaseUnavailable):
                # reconnecting failed: the server is away, unless it answered (a wrong DSN)
                return not any(m in str(exc) for m in _NOT_TRANSIENT)
            return isinstance(exc, psycopg.Error) and classify(exc) == "connection"

        for attempt in stamina.retry_context(on=away, attempts=None, timeout=None,
                                             wait_initial=0.2, wait_max=5.0):
            with attempt, self._resolve_lock:
                if self.stop.is_set() and self.stopping_since is not None and \
                        time.monotonic() - self.stopping_since > self.cfg.shutdown_timeout:
                    raise RuntimeError("stopping with new instruments unregistered: the spool "
                                       "keeps their messages for the next start")
                try:
                    if self._resolve_conn is None or self._resolve_conn.closed:
                        self._resolve_conn = connect(self.dsn, autocommit=True)
                    return fn(self._resolve_conn)
                except Exception as exc:
                    if away(exc):
                        log.warning("cannot register %s yet: %s", what, exc)
                    if self._resolve_conn is not None:
                        self._resolve_conn.close()
                        self._resolve_conn = None
                    raise
        raise AssertionError("unreachable")

    def _new_pipeline(self, label: str, setup, tokens=None, broker: str = "kite") -> Pipeline:
        """A pipeline for one broker's streams: Kite's decoder, or Angel One's SmartStream
        decoder keyed by the registry (its keys preloaded from ``setup``; a token first met
        registered through :meth:`_register_angel`)."""
        from ingestor.pipeline.state import load_state

        pl = Pipeline(f"{label}-idle", resolve=lambda toks: self._resolve(toks, broker),
                      settings=self.settings)
        if broker == "angel":
            from ingestor._core import SmartStreamDecoder
            from ingestor.store.instruments import angel_keys

            dec = SmartStreamDecoder(8192)
            keys = angel_keys(setup)
            dec.add_keys(keys)
            dec.resolver = self._register_angel
            pl.decoder = dec
            if tokens is not None:  # the connection's (exchange type, token)s: engine keys
                wanted = set(tokens)
                tokens = [k for e, t, k in keys if (e, t) in wanted]
        # a connection's engine continues only its instruments (tokens): another engine's
        # pending candles and books are not its to write at shutdown; recovery takes them all
        load_state(setup, pl, tokens=tokens)
        self.pipelines.append(pl)
        return pl

    async def _committed_of(self, stream: str) -> int:
        from ingestor.store.offsets import acommitted

        return await self.side.run(lambda c: acommitted(c, stream))

    def _open_setup(self, connect_timeout: int = 10):
        """(worker thread) The set-up connection, with the schema checked current."""
        from ingestor.store.dsn import connect
        from ingestor.store.migrate import require_current

        setup = connect(self.dsn, autocommit=True, connect_timeout=connect_timeout)
        try:
            require_current(setup)
        except BaseException:
            setup.close()
            raise
        return setup

    async def _wait_for_database(self):
        """The set-up connection, once the database answers and the schema is current."""

        loop = asyncio.get_running_loop()
        delay, said = 0.2, False
        while True:
            try:
                return await loop.run_in_executor(None, self._open_setup)
            except SchemaNotCurrent:
                raise
            except Exception as exc:  # noqa: BLE001 - away at start: spool meanwhile, retry
                if self.stop.is_set():
                    return None
                if any(m in str(exc) for m in _NOT_TRANSIENT):
                    raise  # a wrong DSN, not an absent server: say so and stop
                if not said:
                    log.warning("database not reachable yet (%s): receiving and spooling; the "
                                "pipeline starts when it answers", exc)
                    said = True
                try:
                    await asyncio.wait_for(self.stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)

    async def _prepare_early(self) -> None:
        """Before the feeds connect, when there is no leftover to replay first: if the database
        answers at once, check the schema and seed the live pipelines now, so the first
        messages are aggregated as they arrive instead of queueing behind the set-up.  (With
        the database away, or leftovers to replay, the feeds do not wait: ``_pipelines``
        does this once it can.)"""
        if self.leftovers:
            return
        loop = asyncio.get_running_loop()
        try:
            setup = await loop.run_in_executor(None, self._open_setup, 2)
        except SchemaNotCurrent:
            raise
        except Exception:  # noqa: BLE001 - away: _pipelines waits for it, feeds go on
            return
        try:
            self.pipeline_ready = True
            await self._live_drivers(setup)
        finally:
            await loop.run_in_executor(None, setup.close)

    async def _live_drivers(self, setup) -> None:
        loop = asyncio.get_running_loop()
        for conn in self.connections:
            pl = await loop.run_in_executor(None, self._new_pipeline, conn.label, setup,
                                            conn.tokens, conn.plan.broker)
            conn.driver = Driver(pl, self.queue, self.pool,
                                 flush_interval=self.cfg.pipeline.flush_interval,
                                 open_candle_interval=self.cfg.pipeline.open_candle_interval)

    async def _pipelines(self) -> None:
        """Wait for the database, replay leftovers, then drive every connection's streams."""
        if not all(c.driver is not None for c in self.connections):
            await self._recover_then_seed()
            if not all(c.driver is not None for c in self.connections):
                return  # stopped before the database answered
        async with asyncio.TaskGroup() as tg:
            for conn in self.connections:
                tg.create_task(drive_streams(conn.driver, lambda c=conn: c.streams, conn.wakeup,
                                             self.stop, self._committed_of,
                                             on_done=lambda sp, c=conn: c.streams.remove(sp)),
                               name=f"pipeline-{conn.label}")

    async def _recover_then_seed(self) -> None:
        loop = asyncio.get_running_loop()
        setup = await self._wait_for_database()
        if setup is None:
            return
        try:
            self.pipeline_ready = True
            leftovers = self.leftovers
            if leftovers:
                size = self.spool.bytes
                log.info("replaying %d stream(s) an earlier run left in the spool (%d bytes)",
                         len(leftovers), size)
                for sp in leftovers:
                    self.by_stream[sp.stream] = sp
                # one recovery pipeline per broker: each stream through its header's decoder
                by_broker: dict[str, list] = {}
                for sp in leftovers:
                    by_broker.setdefault(sp.broker, []).append(sp)
                ticks = 0
                for broker, streams in sorted(by_broker.items()):
                    pl = await loop.run_in_executor(None, self._new_pipeline,
                                                    f"recovery-{broker}", setup, None, broker)
                    rec = Driver(pl, self.queue, self.pool)
                    done_now = asyncio.Event()
                    done_now.set()
                    await drive_streams(rec, lambda s=streams: s, asyncio.Event(), done_now,
                                        self._committed_of)
                    ticks += pl.totals["ticks"]
                await self.queue.join()  # committed before the live pipelines seed from it
                log.info("replayed spool left by an earlier run: %d stream(s), %d ticks",
                         len(leftovers), ticks)
            await self._live_drivers(setup)
        finally:
            await loop.run_in_executor(None, setup.close)

    # -- writer side ---------------------------------------------------------

    async def _write(self) -> None:
        m = self.metrics

        async def take():
            b = await self.queue.get()
            if b is None:
                self.queue.task_done()
            return b

        async def written(b: FlushBatch, outcome: str, seconds: float) -> None:
            # in commit order, one call per batch taken (Writer.write_all)
            try:
                self._count_postback_letters(b, outcome == "written")
                m.batches.labels(outcome).inc()
                m.flush_latency.observe(seconds)
                if outcome == "written":
                    m.ticks_written.inc(b.n_ticks)
                    m.candles_written.inc(b.n_candles)
                    m.snapshots_written.inc(b.n_snapshots)
                    m.postbacks.inc(len(b.texts))
                    if b.first_recv_ns:
                        # the batch's oldest tick: the longest any of its ticks waited
                        m.tick_to_commit.observe((time.time_ns() - b.first_recv_ns) / 1e9)
                sp = self.by_stream.get(b.stream)
                if sp is not None:
                    sp.release(b.last_seq)
                m.db_up.set(1)
                await self._after_commit(b, outcome)
            finally:
                self.queue.task_done()

        await self.writer.write_all(take, written)

    async def _after_commit(self, b: FlushBatch, outcome: str) -> None:
        """What follows a batch's commit, in commit order (the writer role publishes its
        closed candles: ``ingestor.pipeline.log_source``)."""

    async def _gaps(self) -> None:
        """Record feed gaps (retried)."""
        while not (self.stop.is_set() and not self.gaps):
            if self.gaps:
                async def record(c):
                    while self.gaps:
                        await c.execute(*gap_row_sql(self.gaps[0]))
                        self.gaps.pop(0)
                try:
                    await self.side.run(record)
                except Exception as exc:  # noqa: BLE001 - retried
                    log.warning("cannot record feed gap yet: %s", exc)
                    await asyncio.sleep(0.5)
            try:
                await asyncio.wait_for(self.stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def _postbacks(self, conn, batch: FlushBatch) -> None:
        await self._on_texts(conn, batch)
        self._postback_results[id(batch)] = self._on_texts.store.last_result

    def _count_postback_letters(self, batch: FlushBatch, written: bool) -> None:
        """The dead letters of a committed batch's postbacks: counted once, by kind."""
        from ingestor.metrics import postback_dead_letter_kind

        res = self._postback_results.pop(id(batch), None)
        if not written or res is None or not res.dead_letters:
            return
        for reason in res.reasons:
            self.metrics.postback_dead_letters.labels(postback_dead_letter_kind(reason)).inc()
            self.last_postback_dead_letter = reason[:300]
        self.postback_dead_letters += res.dead_letters

    async def _mark_to_market(self) -> None:
        """Positions marked to the latest prices every second: one statement, no tick query."""
        from ingestor.orders.store import amark_to_market

        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.cfg.pipeline.mark_interval)
                break
            except asyncio.TimeoutError:
                pass
            prices: dict = {}
            for pl in self.pipelines:
                prices.update(pl.latest_prices())
            if not prices:
                continue
            try:
                await self.side.run(lambda c: amark_to_market(c, prices))
            except Exception as exc:  # noqa: BLE001 - retried at the next cadence
                log.debug("mark to market skipped: %s", exc)

    async def _compact(self) -> None:
        """TimescaleDB: every ``writer.compact_interval`` seconds, compress the closed chunks
        of ``tick_data`` and merge the small compressed batches of direct COPYs
        (``ingestor.store.timescale.compact``), off the event loop, on its own connection."""
        interval = self.cfg.writer.compact_interval
        if not interval:
            return
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), interval)
                break
            except asyncio.TimeoutError:
                pass
            done: asyncio.Future = loop.create_future()

            def work() -> None:
                try:
                    result = self._compact_once()
                except BaseException as exc:  # noqa: BLE001 - reported on the loop
                    # bound now: the name is unset once the except clause ends
                    loop.call_soon_threadsafe(lambda e=exc: done.done() or done.set_exception(e))
                else:
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

            # a daemon thread: a long compaction never holds up the process's exit
            threading.Thread(target=work, name="compact", daemon=True).start()
            try:
                result = await done
            except Exception as exc:  # noqa: BLE001 - tried again at the next cadence
                from ingestor.store.dsn import error_line

                log.warning("compaction of closed tick_data chunks skipped: %s", error_line(exc))
                continue
            if result is not None and (result.compressed or result.recompressed):
                log.info("tick_data: %d closed chunk(s) compressed, %d recompressed",
                         len(result.compressed), len(result.recompressed))

    def _compact_once(self):
        from ingestor.store import timescale
        from ingestor.store.dsn import connect

        with connect(self.dsn, autocommit=True) as conn:
            if timescale.detect(conn).installed is None:
                return None
            return timescale.compact(conn, "tick_data")

    # -- housekeeping --------------------------------------------------------

    async def _monitor(self) -> None:
        loop = asyncio.get_running_loop()
        m = self.metrics
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.1)
            lag = max(0.0, loop.time() - t0 - 0.1)
            m.loop_lag.set(lag)
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
                m.loop_lag_max.set(lag)
            now_ns = time.time_ns()
            for conn in self.connections:
                if conn.feed is not None and conn.feed.stats.last_message_ns:
                    m.feed_lag.labels(conn.label).set((now_ns - conn.feed.stats.last_message_ns) / 1e9)
            m.db_up.set(1 if self.writer.up and self.pipeline_ready else 0)
            m.spool_bytes.set(self.spool.bytes)
            m.spool_dropped.set(self.spool.dropped)
            m.spool_alarm.set(1 if self.spool.alarmed else 0)
            self._notify_state(loop.time())

    def _notify_state(self, now: float) -> None:
        """systemd (``Type=notify``): ``WATCHDOG=1`` from this loop while it turns; ``READY=1``
        once every feed connection is receiving (the spool takes what arrives), whether the
        database answers or not: with it away the daemon spools, which is its normal way
        through an outage, so that is said in ``STATUS`` rather than holding back the start.
        A process without feeds (the writer role) is ready once its database answered."""
        n = self.notifier
        if not n.enabled:
            return
        if n.watchdog_interval and now >= self._watchdog_due:
            self._watchdog_due = now + n.watchdog_interval
            n.notify("WATCHDOG=1")
        if self.stop.is_set():
            return
        ready, status = self._readiness()
        if ready:
            n.set_ready(status)
        else:
            n.set_status(status)

    def _readiness(self) -> tuple[bool, str]:
        """(ready, the ``STATUS`` line) for :meth:`_notify_state` (the feed role has its own)."""
        feeds = [bool(c.feed is not None and c.feed.stats.connected) for c in self.connections]
        db = bool(self.writer.up and self.pipeline_ready)
        status = (f"receiving on {sum(feeds)} of {len(feeds)} connection(s); "
                  if feeds else "") + ("database connected" if db else "database away: spooling")
        return bool(all(feeds) and (feeds or db)), status

    def decoder_totals(self) -> dict[str, int]:
        """Decoder counters summed over every pipeline of this run (read at scrape time)."""
        totals: dict[str, int] = {}
        for pl in list(self.pipelines):
            for k, v in pl.decoder.stats().items():
                totals[k] = totals.get(k, 0) + v
            totals["bad_token"] = totals.get("bad_token", 0) + pl.totals["bad_tokens"]
        return totals

    def health(self) -> tuple[bool, dict]:
        """200 only when every feed is connected, the database takes writes, the spool is
        below its alarm and writing, no batch was set aside since the start (a dead
        letter needs a person: ``ingestor dead-letter list``), no damaged spool record
        was met (the segment is kept in the spool's ``damaged/`` folder) and no postback was
        set aside (``postback_dead_letters``)."""
        w = self.writer
        feeds = {c.label: bool(c.feed and c.feed.stats.connected) for c in self.connections}
        db = w.up and self.pipeline_ready and self.failed is None and not w.fatal
        sp = self.spool
        ok = (all(feeds.values()) and db and not sp.alarmed and sp.error is None
              and not w.dead_letters_since_start and not sp.damaged
              and not self.postback_dead_letters)
        return ok, {"feeds": feeds, "database": bool(w.up and self.pipeline_ready),
                    "writer_stopped": w.fatal, "dead_letters": w.dead_letters_since_start,
                    "last_dead_letter": w.last_dead_letter,
                    "spool_bytes": self.spool.bytes, "spool_alarm": self.spool.alarmed,
                    "spool_error": self.spool.error, "failed": self.failed,
                    "spool_damaged": {"stretches": sp.damaged, "bytes": sp.damaged_bytes,
                                      "records_lost": sp.lost_records},
                    "postback_dead_letters": self.postback_dead_letters,
                    "last_postback_dead_letter": self.last_postback_dead_letter}

    # -- main ----------------------------------------------------------------

    def _request_stop(self, why: str) -> None:
        if self.stop.is_set():
            return
        self.stopping_since = time.monotonic()
        self.stop.set()
        self.notifier.stopping(f"stopping ({why}): draining the spool, committing")
        for c in self.connections:
            if c.feed is not None:
                asyncio.ensure_future(c.feed.close())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()

        def on_signal(signame):
            if self.stop.is_set():
                if time.monotonic() - (self.stopping_since or 0) < SIGNAL_REPEAT:
                    log.info("%s again: already stopping", signame)
                    return
                log.error("second %s: exiting at once (the spool keeps what was not committed)",
                          signame)
                self.spool.close()
                os._exit(1)
            log.info("%s: stopping: draining the spool, flushing candles, committing", signame)
            self._request_stop(signame)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)

        def on_hangup():
            # the operator wrote fresh daily tokens to an Angel feed's credentials file
            angel = [c for c in self.connections if c.plan.broker == "angel" and c.feed]
            log.info("SIGHUP: %d Angel One connection(s) reconnect with their credentials "
                     "read again", len(angel))
            for c in angel:
                asyncio.ensure_future(c.feed.reload())

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        server = None
        if self.cfg.metrics.listen:
            host, _, port = self.cfg.metrics.listen.rpartition(":")
            server = await serve(host or "127.0.0.1", int(port), self.metrics, self.health)
            log.info("metrics on http://%s/metrics", self.cfg.metrics.listen)
        self.spool.start()
        await self._prepare_early()
        for conn in self.connections:
            p = conn.plan
            f = p.feed
            if p.broker == "angel":
                conn.feed = self._angel_feed(conn)
                continue
            conn.feed = KiteFeed(
                conn.label, f.url, p.api_key, p.access_token, conn.tokens,
                on_message=lambda s, p, t, r, c=conn: self._on_message(c, s, p, t, r),
                on_connect=lambda s, c=conn: self._on_connect(c, s),
                on_disconnect=lambda s, st, why, c=conn: self._on_disconnect(c, s, st, why),
                heartbeat_timeout=f.heartbeat_timeout, reconnect_min=f.reconnect_min,
                reconnect_max=f.reconnect_max, rejected_retry=f.rejected_retry,
                connect_timeout=f.connect_timeout)
        log.info("running: %d connection(s), %d tokens", len(self.connections),
                 sum(len(c.tokens) for c in self.connections))
        timed_out = False
        try:
            async with asyncio.TaskGroup() as tg:
                def task(coro, name):
                    return tg.create_task(self._guard(name, coro), name=name)

                feeds = [task(self._run_feed(c), f"feed-{c.label}") for c in self.connections]
                pipes = task(self._pipelines(), "pipeline")
                writer = task(self._write(), "writer")
                side = [task(self._gaps(), "gaps"), task(self._mark_to_market(), "mark-to-market"),
                        task(self._compact(), "compact")]
                monitor = task(self._monitor(), "monitor")
                await self.stop.wait()
                self._end_gaps()
                budget = self.cfg.shutdown_timeout

                def left() -> float:
                    return max(0.5, budget - (time.monotonic() - self.stopping_since))

                if feeds:  # (none in a writer process: ingestor.pipeline.log_source)
                    await asyncio.wait(feeds, timeout=5)
                for c in self.connections:
                    if c.streams:
                        c.streams[-1].end()
                    c.wakeup.set()
                _, pending = await asyncio.wait([pipes], timeout=left())
                if not pending and not writer.done():
                    await asyncio.wait_for(self.queue.put(None), timeout=left())
                    _, pending = await asyncio.wait([writer], timeout=left())
                if pending:
                    timed_out = True
                    log.error("shutdown took longer than %.0f s; exiting with the spool kept "
                              "(%d bytes) for the next start", budget, self.spool.bytes)
                    for t in [*feeds, pipes, writer]:
                        t.cancel()
                await asyncio.wait(side, timeout=5 if not timed_out else 0.1)
                for t in [*side, monitor]:
                    t.cancel()
        except* Exception:
            pass  # each failure was reported by _guard; self.failed makes the exit status 1
        finally:
            if self.gaps:
                log.error("%d feed gap(s) could not be recorded", len(self.gaps))
            if server is not None:
                server.close()
            await self.writer.close()
            await self.side.close()
            if self._resolve_conn is not None:
                self._resolve_conn.close()
            await loop.run_in_executor(None, self.spool.close)
            self.pool.shutdown(wait=False)
        s = self.writer.stats
        log.info("stopped: %d ticks, %d candles, %d snapshots in %d transactions", s.ticks,
                 s.candles, s.snapshots, s.batches)
        return 1 if (self.failed or timed_out) else 0

    def _angel_feed(self, conn: Connection):
        from ingestor.feed.smartstream import SmartStreamFeed

        p, f = conn.plan, conn.plan.feed
        return SmartStreamFeed(
            conn.label, f.url, p.api_key, p.client_code, p.access_token, p.feed_token,
            conn.tokens,
            on_message=lambda s, m, t, r, c=conn: self._on_message(c, s, m, t, r),
            on_connect=lambda s, c=conn: self._on_connect(c, s),
            on_disconnect=lambda s, st, why, c=conn: self._on_disconnect(c, s, st, why),
            heartbeat_timeout=f.heartbeat_timeout, reconnect_min=f.reconnect_min,
            reconnect_max=f.reconnect_max, rejected_retry=f.rejected_retry,
            connect_timeout=f.connect_timeout, ping_interval=f.ping_interval,
            refresh=p.refresh)

    async def _run_feed(self, conn: Connection) -> None:
        """One connection's feed until stopped (a feed role with leases takes its lease
        first: ``ingestor.feed.jetstream``)."""
        await conn.feed.run(self.stop)

    async def _guard(self, name: str, coro):
        """Run one of the daemon's tasks; a failure is said once, loudly, with the task's name,
        and stops the daemon with exit status 1 (nothing is lost: what is not committed stays
        in the spool for the next start)."""
        try:
            return await coro
        except Exception as exc:
            if self.failed is None:
                self.failed = f"{name}: {type(exc).__name__}: {exc}"
            log.error("the %s task failed (%s: %s); stopping, the spool keeps what was not "
                      "committed", name, type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))
            self._request_stop(name)
            raise

    def _end_gaps(self) -> None:
        now = time.time_ns()
        for c in self.connections:
            if c.gap_start is not None:  # stopped while disconnected: the gap ends here
                stream, started, reason = c.gap_start
                self.gaps.append((c.label, stream, _ts(started), _ts(now),
                                  f"{reason}; daemon stopped", c.gap_tokens()))
                c.gap_start = None
