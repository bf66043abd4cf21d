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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from ingestor.feed.capture import RECORD_HEADER
from ingestor.feed.jetstream import (MalformedMessage, _close, _retry_setup, connect_retrying,
                                     decode_message, ensure_stream, subject_of)
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


def writer_role(cfg, dsn, plans, spool):
    """``ingestor run --role writer``: the daemon's pipeline and writer fed from the log.

    ``plans``: the feeds as the feed processes run them (credentials unused): each
    connection's label names its subject, its tokens seed its pipeline."""
    import nats.errors

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

        async def _live_drivers(self, setup) -> None:
            loop = asyncio.get_running_loop()
            for s in self.subjects:
                pl = await loop.run_in_executor(None, self._new_pipeline, s.label, setup,
                                                s.tokens)
                s.driver = Driver(pl, self.queue, self.pool,
                                  flush_interval=self.cfg.pipeline.flush_interval,
                                  open_candle_interval=self.cfg.pipeline.open_candle_interval)

        async def _pipelines(self) -> None:
            if not all(s.driver is not None for s in self.subjects):
                await self._recover_then_seed()  # leftovers of a local spool, then seed
                if not all(s.driver is not None for s in self.subjects):
                    return
            g = self.cfg.log
            self.nc = await connect_retrying(g, "ingestor-writer", self.stop)
            if self.nc is None:
                return
            js = self.nc.jetstream()
            if await _retry_setup(lambda: ensure_stream(js, g), self.stop) is None:
                return
            async with asyncio.TaskGroup() as tg:
                for s in self.subjects:
                    tg.create_task(self._consume(js, s), name=f"log-{s.label}")

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

        async def _consume(self, js, s) -> None:
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
                except (nats.errors.Error, OSError) as exc:
                    # the log away (a node restarting, a leader moving): what is pending in
                    # the pipeline is flushed meanwhile; the fetch is tried again
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
            return ok and log_up, body

        async def run(self) -> int:
            try:
                return await super().run()
            finally:
                if self._ack_tasks:
                    await asyncio.wait(list(self._ack_tasks), timeout=5)
                if self.nc is not None:
                    await _close(self.nc)

    return WriterRole()


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
