"""The log (NATS JetStream) as the driver's source: ``ingestor run --role writer``.

Each configured connection's raw subject (``ingestor.feed.jetstream``) is read
by a durable pull consumer of its own and driven through the same ``Driver``
and ``Pipeline`` as the local spool, one pipeline per connection (seeded with
that connection's instruments, as the embedded daemon's).  Blocks handed to
the driver are runs of consecutive records of one capture stream.

Exactly once: the writer commits each capture stream's sequence number in the
batch's transaction (``stream_offsets``, as for spool streams).  A message at
or below what is committed is skipped; one at or below what this process
already fed (a redelivery, a feed's republish) is skipped too.  A message is
acknowledged to JetStream only once the batch covering it committed, so a
writer killed at any point resumes from the consumer's acknowledgement floor,
at or before the database's offsets, and skips what the database has: the
position is the database's, the consumer only saves rereading.  A malformed
message (no capture-record headers) is counted, logged with its JetStream
sequence number and terminated (kept in the stream, never redelivered).

One writer per subject: a subject is read only by the holder of its lease
(``ingestor.feed.lease``); a standby waits for it, then seeds the subject's
pipeline from what is committed.  The stream's identity (its creation time) is
kept in ``stream_offsets``: a stream deleted or re-created stops the writer
(``--accept-new-log-stream`` after an operator's check).  With
``log.publish_candles`` each batch's closed candles are published after its
commit (``ingestor.pipeline.candles_out``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from ingestor.feed.capture import RECORD_HEADER
from ingestor.feed.jetstream import (MalformedMessage, _close, _retry_setup, connect_retrying,
                                     decode_message, ensure_stream, subject_of)
from ingestor.feed.lease import Lease, holder_id, lease_bucket
from ingestor.pipeline.driver import Driver

log = logging.getLogger(__name__)

#: messages per pull request
FETCH = 1024


class StreamAcks:
    """One capture stream's messages awaiting their batch's commit.  The daemon's writer
    task calls ``release(last_seq)`` after each committed batch (as it releases a spool
    stream): the messages at or below it are acknowledged."""

    def __init__(self, stream: str, committed: int, acker, label: str = ""):
        self.stream = stream
        #: the connection (subject) it came on
        self.label = label
        #: records ahead of ``fed + 1``, waiting for the ones before them: seq -> record
        self.waiting: dict[int, tuple] = {}
        self.gap_since: float | None = None
        #: committed in the database (read at first sight, then each batch's)
        self.committed = committed
        #: the highest sequence number handed to the pipeline
        self.fed = committed
        self.held: collections.deque = collections.deque()
        self._acker = acker

    def hold(self, seq: int, msg) -> None:
        self.held.append((seq, msg))

    def release(self, committed_seq: int) -> None:
        if committed_seq > self.committed:
            self.committed = committed_seq
        out = []
        held = self.held
        while held and held[0][0] <= self.committed:
            out.append(held.popleft()[1])
        if out:
            self._acker(out)


class _Runs:
    """Consecutive records of one capture stream gathered into one block for the driver."""

    def __init__(self, driver: Driver):
        self.driver = driver
        self.buf = bytearray()
        self.stream = None
        self.first = self.next = 0
        self.base = -1

    async def add(self, a: StreamAcks, seq: int, recv_ns: int, kind: int, data) -> None:
        if self.buf and (a.stream != self.stream or seq != self.next):
            await self.flush()
        if not self.buf:
            # (base: what the pipeline counts as committed when it switches to the stream)
            self.stream, self.first, self.base = a.stream, seq, a.fed
        self.buf += RECORD_HEADER.pack(recv_ns, kind, len(data))
        self.buf += data
        self.next = seq + 1
        a.fed = seq

    async def flush(self) -> None:
        if self.buf:
            await self.driver.feed(self.stream, bytes(self.buf), self.first, self.base)
            self.buf = bytearray()


#: the ``stream_offsets`` row keeping the log stream's identity (its creation time, µs since
#: the epoch): no capture stream id has a ``:``
IDENTITY = "log-stream:{}"


def writer_role(cfg, dsn, plans, spool, accept_new_stream: bool = False):
    """``ingestor run --role writer``: the daemon's pipeline and writer fed from the log.

    ``plans``: the feeds as the feed processes run them (credentials unused): each
    connection's label names its subject, its tokens seed its pipeline (when this process
    takes the subject's lease: a standby seeds from what the active writer committed).
    ``accept_new_stream``: the log's stream was re-created and an operator checked what
    the old one held (``--accept-new-log-stream``): record the new one's identity."""
    import nats.errors
    import nats.js.errors

    from ingestor.daemon import Daemon

    class WriterRole(Daemon):
        def __init__(self):
            super().__init__(cfg, dsn, plans, spool)
            # the connections are the feed processes': here only subjects and instruments
            self.subjects = self.connections
            self.connections = []
            for s in self.subjects:
                for g in (self.metrics.feed_connected, self.metrics.reconnects,
                          self.metrics.feed_lag):
                    g.remove(s.label)
                self.metrics.log_pending.labels(s.label)
            self.nc = None
            self.malformed = 0
            self.acks: dict[str, StreamAcks] = {}
            self._ack_tasks: set[asyncio.Task] = set()
            self.metrics.log_up.set_function(
                lambda: 1 if self.nc is not None and self.nc.is_connected else 0)
            self.holder = holder_id("writer")
            self.leases: dict[str, Lease] = {}
            self._keepers: list[asyncio.Task] = []
            #: the log stream's creation time (µs) as this writer found it at its start
            self.stream_created: int | None = None
            self._checked_at = 0.0
            self.candles = None
            if cfg.log.publish_candles:
                from ingestor.pipeline.candles_out import CandlePublisher

                self.candles = CandlePublisher(cfg.log.candles_prefix, self.settings.timeframes,
                                               self.metrics)

        async def _after_commit(self, b, outcome: str) -> None:
            if self.candles is not None and outcome == "written":
                await self.candles.committed(b)

        async def _live_drivers(self, setup) -> None:
            return  # each subject's pipeline is seeded once its lease is taken (_seed)

        async def _seed(self, s) -> bool:
            """The subject's pipeline, seeded from what is committed now (False: stopped
            before the database answered)."""
            loop = asyncio.get_running_loop()
            setup = await self._wait_for_database()
            if setup is None:
                return False
            try:
                pl = await loop.run_in_executor(None, self._new_pipeline, s.label, setup,
                                                s.tokens)
            finally:
                await loop.run_in_executor(None, setup.close)
            if self.candles is not None:
                pl.keep_closed = True
            s.driver = Driver(pl, self.queue, self.pool,
                              flush_interval=self.cfg.pipeline.flush_interval,
                              open_candle_interval=self.cfg.pipeline.open_candle_interval)
            return True

        async def _pipelines(self) -> None:
            if not self.pipeline_ready:
                await self._recover_then_seed()  # leftovers of a local spool first
                if not self.pipeline_ready:
                    return
            g = self.cfg.log
            self.nc = await connect_retrying(g, "ingestor-writer", self.stop)
            if self.nc is None:
                return
            if self.candles is not None:
                self.candles.nc = self.nc
            js = self.nc.jetstream()
            info = await _retry_setup(lambda: ensure_stream(js, g), self.stop)
            if info is None:
                return
            if not await self._same_identity(info):
                return
            kv = await _retry_setup(lambda: lease_bucket(js, g), self.stop)
            if kv is None:
                return
            async with asyncio.TaskGroup() as tg:
                for s in self.subjects:
                    tg.create_task(self._consume(js, kv, s), name=f"log-{s.label}")

        def _replaced(self, line: str) -> None:
            """Stop loudly: one line, exit status 1, nothing more read from the log."""
            self.metrics.log_stream_replaced.set(1)
            if self.failed is None:
                self.failed = line
                log.error("%s", line)
            self._request_stop("log stream replaced")

        async def _same_identity(self, info) -> bool:
            """The stream is the one the writers read before (its creation time, kept in
            ``stream_offsets``), or the first one: recorded.  A stream deleted and
            re-created numbers its messages from 1 again, and what the old one held that
            no writer committed is gone (its feeds released it from their spools): that
            needs a person, so the writer stops rather than go on past a silent loss."""
            from ingestor.store.offsets import NONE, aadvance, acommitted

            g = self.cfg.log
            created = _created_us(info)
            self.stream_created = created
            if created is None:
                return True  # (a server that does not say: nothing to compare)
            key = IDENTITY.format(g.stream)

            async def check(c):
                had = await acommitted(c, key)
                if had == NONE:
                    await aadvance(c, key, created)
                elif had != created and accept_new_stream:
                    await c.execute("UPDATE stream_offsets SET committed_seq = %s, "
                                    "updated_at = now() WHERE stream = %s", (created, key))
                    log.warning("log stream %s: accepted as new (created %s; the writers "
                                "read the one created %s before)", g.stream, _iso(created),
                                _iso(had))
                    return NONE
                return had

            had = await _retry_db(lambda: self.side.run(check))
            if had not in (NONE, created):
                self._replaced(
                    f"log stream {g.stream} was deleted and re-created (created {_iso(created)}; "
                    f"the writers read the one created {_iso(had)}): its sequence numbers "
                    "restarted and what the old one held uncommitted may be lost; check "
                    "feed_gaps and the feeds' spools, then start one writer with "
                    "--accept-new-log-stream")
                return False
            return True

        async def _check_stream(self, js) -> bool:
            """(A read from the log failed) the stream still the one found at the start?
            False: it was deleted or replaced (said, stopping)."""
            from nats.js.errors import NotFoundError

            now = time.monotonic()
            if now - self._checked_at < 1.0:
                return True
            self._checked_at = now
            g = self.cfg.log
            try:
                info = await js.stream_info(g.stream)
            except NotFoundError:
                self._replaced(f"log stream {g.stream} was deleted under the writer: what it "
                               "held uncommitted may be lost; stopping (a stream created again "
                               "is refused until --accept-new-log-stream)")
                return False
            except Exception:  # noqa: BLE001 - the log away: the fetch is tried again
                return True
            created = _created_us(info)
            if created is not None and self.stream_created is not None and \
                    created != self.stream_created:
                self._replaced(
                    f"log stream {g.stream} was deleted and re-created under the writer "
                    f"(created {_iso(created)}, was {_iso(self.stream_created)}): its sequence "
                    "numbers restarted and what the old one held uncommitted may be lost; "
                    "check, then start one writer with --accept-new-log-stream")
                return False
            return True

        async def _subscribe(self, js, s):
            """The subject's durable consumer, made anew from its acknowledgement floor: a
            writer acknowledges only what is committed, so everything after the floor is
            delivered again, in order (what the database has is skipped).  Redeliveries of
            what a dead writer held would otherwise come after ``ack_wait``, behind newer
            messages."""
            from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
            from nats.js.errors import NotFoundError

            g = self.cfg.log
            subject = subject_of(g.subject_prefix, s.label)
            durable = f"{g.consumer}-{s.label}"
            floor = 0
            try:
                info = await js.consumer_info(g.stream, durable)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                await js.delete_consumer(g.stream, durable)
            except NotFoundError:
                pass
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                    ack_wait=g.ack_wait, max_ack_pending=g.max_ack_pending,
                                    max_deliver=-1, filter_subject=subject,
                                    deliver_policy=(DeliverPolicy.BY_START_SEQUENCE if floor
                                                    else DeliverPolicy.ALL),
                                    opt_start_seq=floor + 1 if floor else None)
            log.info("%s: reading %s from log sequence %d", s.label, subject, floor + 1)
            return await js.pull_subscribe(subject, durable=durable, stream=g.stream,
                                           config=config)

        async def _consume(self, js, kv, s) -> None:
            """The subject's lease (a standby waits here), its pipeline, then its messages."""
            lease = Lease(kv, f"writer.{s.label}", self.cfg.log, self.holder,
                          f"writer of {s.label}", metrics=self.metrics)
            self.leases[s.label] = lease
            if not await lease.take(self.stop):
                return
            # renewed until the process ends (the last batches commit after this returns)
            self._keepers.append(asyncio.get_running_loop().create_task(
                lease.keep(), name=f"lease-{s.label}"))
            if not await self._seed(s):
                return
            driver: Driver = s.driver
            interval = self.cfg.pipeline.flush_interval
            errors = 0
            psub = None
            while not self.stop.is_set():
                if psub is None:
                    psub = await _retry_setup(lambda: self._subscribe(js, s), self.stop)
                    if psub is None:
                        break
                    s.delivered = None  # the consumer's delivery count starts again
                due = driver.due_in()
                wait = max(0.02, min(interval if due is None else due, 1.0))
                try:
                    msgs = await psub.fetch(batch=FETCH, timeout=wait)
                    errors = 0
                except (nats.errors.TimeoutError, TimeoutError):
                    msgs = []
                    # a fetch from a deleted stream only times out: look (once a second)
                    if not await self._check_stream(js):
                        break
                except (nats.errors.Error, OSError) as exc:
                    # the log away (a node restarting, a leader moving): what is pending in
                    # the pipeline is flushed meanwhile; the fetch is tried again.  A stream
                    # deleted (and re-created) under the writer stops it
                    if not await self._check_stream(js):
                        break
                    if isinstance(exc, nats.js.errors.NotFoundError):
                        psub = None  # the consumer is gone (deleted): made again
                    errors += 1
                    if errors == 1:
                        log.warning("%s: cannot read the log (%s: %s); retrying", s.label,
                                    type(exc).__name__, exc)
                    msgs = []
                    await asyncio.sleep(min(2.0, 0.05 * 2 ** min(errors, 6)))
                if not msgs:
                    runs = _Runs(driver)
                    await self._accept_gaps(s.label, runs)
                    await runs.flush()
                else:
                    if not await self._feed(s, msgs):
                        # a delivery this process never saw: read again from the floor
                        # (what was fed is skipped, what was missed comes in order)
                        try:
                            await psub.unsubscribe()
                        except Exception:  # noqa: BLE001 - replaced anyway
                            pass
                        psub = None
                    try:
                        self.metrics.log_pending.labels(s.label).set(
                            msgs[-1].metadata.num_pending)
                    except Exception:  # noqa: BLE001 - a reply without metadata
                        pass
                await driver.tick()
            await driver.finish()

        async def _stream_acks(self, stream: str, label: str) -> StreamAcks:
            a = self.acks.get(stream)
            if a is None:
                committed = await _retry_db(lambda: self._committed_of(stream))
                a = self.acks[stream] = StreamAcks(stream, committed, self._ack, label)
                self.by_stream[stream] = a  # the writer task releases it after each commit
            return a

        async def _feed(self, s, msgs) -> bool:
            """Each capture stream's records in sequence order to the driver, in runs.
            False: the consumer's delivery sequence jumped (a message delivered and lost on
            the way, a consumer reset): what follows is left for a new read from the floor."""
            runs = _Runs(s.driver)
            ok = True
            for m in msgs:
                try:
                    delivered = m.metadata.sequence.consumer
                except Exception:  # noqa: BLE001 - not a JetStream delivery
                    delivered = None
                if delivered is not None:
                    if s.delivered is not None and delivered != s.delivered + 1:
                        log.warning("%s: the log's delivery went from %d to %d: reading "
                                    "again from the acknowledged floor", s.label, s.delivered,
                                    delivered)
                        ok = False
                        break
                    s.delivered = delivered
                try:
                    stream, seq, recv_ns, kind = decode_message(m.headers)
                except MalformedMessage as exc:
                    await self._set_aside(s, m, str(exc))
                    continue
                a = await self._stream_acks(stream, s.label)
                if seq <= a.fed or seq in a.waiting:
                    # committed, or fed already: a redelivery or a republish
                    if seq <= a.committed:
                        self._ack([m])
                    else:
                        a.hold(seq, m)
                    continue
                a.hold(seq, m)
                if seq != a.fed + 1:
                    # ahead of the next one: a publish the feed is sending again can land
                    # after the ones that followed it; wait for it (in order or not at all)
                    a.waiting[seq] = (recv_ns, kind, m.data)
                    if a.gap_since is None:
                        a.gap_since = time.monotonic()
                    continue
                await runs.add(a, seq, recv_ns, kind, m.data)
                await self._drain_waiting(a, runs)
            await self._accept_gaps(s.label, runs)
            await runs.flush()
            return ok

        async def _drain_waiting(self, a: StreamAcks, runs: "_Runs") -> None:
            while a.fed + 1 in a.waiting:
                seq = a.fed + 1
                recv_ns, kind, data = a.waiting.pop(seq)
                await runs.add(a, seq, recv_ns, kind, data)
            if not a.waiting:
                a.gap_since = None

        async def _accept_gaps(self, label: str, runs: "_Runs") -> None:
            """Messages missing for longer than a feed takes to send again are not coming
            (damaged in the feed's spool, too large for the log): go on without them."""
            wait = 3 * self.cfg.log.ack_timeout + 5
            now = time.monotonic()
            for a in list(self.acks.values()):
                if a.label != label or not a.waiting or now - a.gap_since < wait:
                    continue
                first = min(a.waiting)
                log.warning("%s: %s: message(s) %d..%d never came (waited %.0f s): going on "
                            "without them", label, a.stream, a.fed + 1, first - 1, wait)
                self.metrics.log_gaps.inc()
                a.fed = first - 1
                await self._drain_waiting(a, runs)
                if a.waiting:
                    a.gap_since = now

        async def _set_aside(self, s, m, reason: str) -> None:
            self.malformed += 1
            self.metrics.log_malformed.inc()
            try:
                where = m.metadata.sequence.stream
            except Exception:  # noqa: BLE001
                where = "?"
            log.error("%s: malformed message at log sequence %s set aside (%s): terminated, "
                      "kept in the stream", s.label, where, reason)
            try:
                await m.term()
            except Exception as exc:  # noqa: BLE001 - redelivered, set aside again
                log.warning("cannot terminate it (%s)", exc)

        def _ack(self, msgs) -> None:
            async def ack():
                for m in msgs:
                    try:
                        await m.ack()
                    except Exception:  # noqa: BLE001 - redelivered later, skipped then
                        pass
            t = asyncio.get_running_loop().create_task(ack(), name="log-ack")
            self._ack_tasks.add(t)
            t.add_done_callback(self._ack_tasks.discard)

        def health(self):
            ok, body = super().health()
            log_up = self.nc is not None and self.nc.is_connected
            body["role"] = "writer"
            body["log"] = log_up
            body["log_malformed"] = self.malformed
            body["leases"] = {k: ("active" if v.held else "standby")
                              for k, v in self.leases.items()}
            return ok and log_up, body

        async def run(self) -> int:
            try:
                return await super().run()
            finally:
                if self._ack_tasks:
                    await asyncio.wait(list(self._ack_tasks), timeout=5)
                for t in self._keepers:
                    t.cancel()
                for lease in self.leases.values():  # everything committed: a standby may go
                    await lease.release()
                if self.nc is not None:
                    await _close(self.nc)

    return WriterRole()


def _created_us(info) -> int | None:
    import datetime as dt

    c = getattr(info, "created", None)
    if c is None:
        return None
    if c.tzinfo is None:
        c = c.replace(tzinfo=dt.timezone.utc)
    return (c - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)


def _iso(us: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(us / 1e6, dt.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


async def _retry_db(fn):
    """``await fn()`` retried while the database is away (the committed offset of a stream
    is needed before its messages go on)."""
    import psycopg
    import stamina

    from ingestor.store.errors import classify

    def away(exc: Exception) -> bool:
        return isinstance(exc, psycopg.Error) and classify(exc) == "connection"

    for attempt in stamina.retry_context(on=away, attempts=None, timeout=None,
                                         wait_initial=0.2, wait_max=5.0):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")
