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
(``--accept-new-log-stream`` after an operator's check).

Retention: each subject's committed log position (the JetStream sequence of the last
committed message on it, and that message's receive time) is kept in ``stream_offsets``
(``log-seq:<stream>:<subject>``, ``log-ns:...``; saved after a commit once a second and
after each while stopping, so it may lag, never lead).  A capture stream's messages
missing where the log's first sequence is past that position + 1 were dropped by
retention before any writer committed them: the writer stops loudly (exit 1, one line),
or with ``--accept-log-loss`` records the loss in ``feed_gaps``, counts it
(``ingestor_log_retention_lost``) and goes on.  A loss of whole capture streams or of a
stream's tail leaves no hole in any stream's numbering and is not seen this way.
``ingestor_log_retention_used`` (per subject, 1 = at the limit) says how close the oldest
uncommitted message is to the stream's limits (age, bytes, messages); a warning is logged
from 0.8.  With ``log.publish_candles`` each batch's closed candles are published after its
commit (``ingestor.pipeline.candles_out``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from ingestor.feed.capture import record_offset
from ingestor.feed.jetstream import (HDR_RECV_NS, MalformedMessage, _close, _retry_setup,
                                     connect_retrying, decode_records, ensure_stream,
                                     subject_of)
from ingestor.feed.lease import Lease, holder_id, lease_bucket
from ingestor.pipeline.driver import Driver

log = logging.getLogger(__name__)

#: messages per pull request
FETCH = 1024


class StreamAcks:
    """One capture stream's messages awaiting their batch's commit.  The daemon's writer
    task calls ``release(last_seq)`` after each committed batch (as it releases a spool
    stream): the messages at or below it are acknowledged."""

    def __init__(self, stream: str, committed: int, acker, label: str = "",
                 on_committed=None):
        self.stream = stream
        #: the connection (subject) it came on
        self.label = label
        #: messages ahead of ``fed + 1``, waiting for the ones before them:
        #: first seq -> (count, records)
        self.waiting: dict[int, tuple] = {}
        self.gap_since: float | None = None
        #: committed in the database (read at first sight, then each batch's)
        self.committed = committed
        #: the highest sequence number handed to the pipeline
        self.fed = committed
        self.held: collections.deque = collections.deque()
        self._acker = acker
        #: ``on_committed(label, log sequence, recv_ns)`` of the last message released
        self._on_committed = on_committed

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
            if self._on_committed is not None:
                self._on_committed(self.label, out[-1])


class _Runs:
    """Consecutive records of one capture stream gathered into one block for the driver,
    across reads of the log (``flush_if_due``: as the spool's driver lingers, so that a busy
    subject reaches the pipeline in blocks of many messages, one worker-thread call each)."""

    def __init__(self, driver: Driver, linger: float = 0.01, linger_bytes: int = 1 << 20):
        self.driver = driver
        self.parts: list = []
        self.stream = None
        self.first = self.next = 0
        self.base = -1
        self.bytes = 0
        self.since = 0.0
        self.linger, self.linger_bytes = linger, linger_bytes

    async def add(self, a: StreamAcks, seq: int, count: int, records) -> None:
        """Records ``seq .. seq + count - 1`` of ``a``'s stream (capture records, format 1)."""
        if self.parts and (a.stream != self.stream or seq != self.next):
            await self.flush()
        if not self.parts:
            # (base: what the pipeline counts as committed when it switches to the stream)
            self.stream, self.first, self.base = a.stream, seq, a.fed
            self.since = time.monotonic()
        self.parts.append(records)
        self.bytes += len(records)
        self.next = seq + count
        a.fed = seq + count - 1

    async def flush(self) -> None:
        if self.parts:
            # (a message's payload as it came when it is the run: no copy)
            chunk = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            self.parts = []
            self.bytes = 0
            await self.driver.feed(self.stream, chunk, self.first, self.base)

    async def flush_if_due(self) -> None:
        if self.parts and (self.bytes >= self.linger_bytes
                           or time.monotonic() - self.since >= self.linger):
            await self.flush()


#: the ``stream_offsets`` row keeping the log stream's identity (its creation time, µs since
#: the epoch): no capture stream id has a ``:``
IDENTITY = "log-stream:{}"
#: a subject's committed log position (JetStream sequence), and that message's receive time
POSITION = "log-seq:{}:{}"
POSITION_NS = "log-ns:{}:{}"
#: seconds between looks at the stream's retention against the writer's position
RETENTION_CHECK = 5.0
#: ``ingestor_log_retention_used`` from which a warning is logged (again once below half)
RETENTION_WARN = 0.8

SQL_POSITION = (
    "INSERT INTO stream_offsets AS o (stream, committed_seq, updated_at) VALUES "
    "(%s, %s, now()), (%s, %s, now()) ON CONFLICT (stream) DO UPDATE SET "
    "committed_seq = greatest(o.committed_seq, excluded.committed_seq), updated_at = now()")


def writer_role(cfg, dsn, plans, spool, accept_new_stream: bool = False,
                accept_loss: bool = False):
    """``ingestor run --role writer``: the daemon's pipeline and writer fed from the log.

    ``plans``: the feeds as the feed processes run them (credentials unused): each
    connection's label names its subject, its tokens seed its pipeline (when this process
    takes the subject's lease: a standby seeds from what the active writer committed).
    ``accept_new_stream``: the log's stream was re-created and an operator checked what
    the old one held (``--accept-new-log-stream``): record the new one's identity.
    ``accept_loss``: messages dropped by the log's retention before any writer committed
    them are recorded in ``feed_gaps`` and counted, not a stop (``--accept-log-loss``)."""
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
            self.js = None
            #: per subject label: (log sequence, recv_ns) of the last committed message
            self.log_pos: dict[str, tuple[int, int]] = {}
            self._pos_saved: dict[str, tuple[int, int]] = {}
            self._retention_warned: set[str] = set()
            self._saved_at = 0.0
            self.candles = None
            if cfg.log.publish_candles:
                from ingestor.pipeline.candles_out import CandlePublisher

                self.candles = CandlePublisher(cfg.log.candles_prefix, self.settings.timeframes,
                                               self.metrics)

        async def _after_commit(self, b, outcome: str) -> None:
            if self.candles is not None and outcome == "written":
                await self.candles.committed(b)
            # the subjects' committed log positions: once a second, and each batch while
            # stopping (the last ones are then saved before the process ends)
            now = time.monotonic()
            if self.log_pos and (self.stop.is_set() or now - self._saved_at >= 1.0):
                self._saved_at = now
                try:
                    await asyncio.wait_for(self._save_positions(), 5)
                except Exception:  # noqa: BLE001 - saved at the next turn
                    pass

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
                                                s.tokens, s.plan.broker)
            finally:
                await loop.run_in_executor(None, setup.close)
            if self.candles is not None:
                pl.keep_closed = True
            s.driver = Driver(pl, self.queue, self.pool,
                              flush_interval=self.cfg.pipeline.flush_interval,
                              open_candle_interval=self.cfg.pipeline.open_candle_interval)
            s.runs = _Runs(s.driver)
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
            js = self.js = self.nc.jetstream()
            info = await _retry_setup(lambda: ensure_stream(js, g), self.stop)
            if info is None:
                return
            if not await self._same_identity(info):
                return
            kv = await _retry_setup(lambda: lease_bucket(js, g), self.stop)
            if kv is None:
                return
            watcher = asyncio.get_running_loop().create_task(self._watch_log(js),
                                                             name="log-retention")
            try:
                async with asyncio.TaskGroup() as tg:
                    for s in self.subjects:
                        tg.create_task(self._consume(js, kv, s), name=f"log-{s.label}")
            finally:
                watcher.cancel()

        def _replaced(self, line: str) -> None:
            """Stop loudly: one line, exit status 1, nothing more read from the log."""
            self.metrics.log_stream_replaced.set(1)
            self._stop_loudly(line, "log stream replaced")

        def _stop_loudly(self, line: str, why: str) -> None:
            if self.failed is None:
                self.failed = line
                log.error("%s", line)
            self._request_stop(why)

        # -- retention ---------------------------------------------------------------

        def _committed_msg(self, label: str, m) -> None:
            """(StreamAcks.release) the last message of a committed run: its subject's
            committed log position moves to it."""
            try:
                seq = m.metadata.sequence.stream
                ns = int(m.headers[HDR_RECV_NS])
            except Exception:  # noqa: BLE001 - a reply without metadata: no position
                return
            had = self.log_pos.get(label)
            if had is None or seq > had[0]:
                self.log_pos[label] = (seq, ns)

        async def _load_position(self, s) -> None:
            """The subject's committed log position as the writers saved it."""
            from ingestor.store.offsets import NONE, acommitted

            subject = subject_of(self.cfg.log.subject_prefix, s.label)
            keys = (POSITION.format(self.cfg.log.stream, subject),
                    POSITION_NS.format(self.cfg.log.stream, subject))

            async def read(c):
                return [await acommitted(c, k) for k in keys]

            seq, ns = await _retry_db(lambda: self.side.run(read))
            if seq != NONE and seq > self.log_pos.get(s.label, (0, 0))[0]:
                self.log_pos[s.label] = (seq, max(ns, 0))
                self._pos_saved[s.label] = (seq, max(ns, 0))

        async def _save_positions(self) -> None:
            g = self.cfg.log
            todo = [(label, p) for label, p in list(self.log_pos.items())
                    if self._pos_saved.get(label) != p]
            if not todo:
                return

            async def save(c):
                for label, (seq, ns) in todo:
                    subject = subject_of(g.subject_prefix, label)
                    await c.execute(SQL_POSITION, (POSITION.format(g.stream, subject), seq,
                                                   POSITION_NS.format(g.stream, subject), ns))
            try:
                await self.side.run(save)
            except Exception as exc:  # noqa: BLE001 - saved at the next turn
                log.debug("log positions not saved yet: %s", exc)
                return
            for label, p in todo:
                self._pos_saved[label] = p

        async def _watch_log(self, js) -> None:
            """Once a second the committed log positions saved; every RETENTION_CHECK
            seconds each held subject's oldest uncommitted message against the stream's
            limits (``ingestor_log_retention_used``)."""
            last = 0.0
            while True:
                await asyncio.sleep(1.0)
                await self._save_positions()
                if time.monotonic() - last < RETENTION_CHECK:
                    continue
                last = time.monotonic()
                try:
                    await self._check_retention(js)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the log away: looked at again
                    log.debug("retention not checked: %s", exc)

        async def _check_retention(self, js) -> None:
            from nats.js.errors import NotFoundError

            g = self.cfg.log
            info = await asyncio.wait_for(js.stream_info(g.stream), 5)
            c, st = info.config, info.state
            max_msgs = c.max_msgs if c.max_msgs and c.max_msgs > 0 else 0
            max_bytes = c.max_bytes if c.max_bytes and c.max_bytes > 0 else 0
            max_age = c.max_age or 0
            avg = st.bytes / st.messages if st.messages else 0
            for label, lease in list(self.leases.items()):
                if not lease.held:
                    continue
                subject = subject_of(g.subject_prefix, label)
                pos = self.log_pos.get(label, (0, 0))[0]
                try:
                    m = await asyncio.wait_for(js.get_msg(
                        g.stream, seq=max(pos + 1, st.first_seq, 1), subject=subject,
                        next=True), 5)
                except NotFoundError:
                    m = None  # nothing uncommitted on the subject
                used = 0.0
                if m is not None and m.seq is not None:
                    after = max(0, st.last_seq - m.seq + 1)
                    if max_msgs:
                        used = max(used, after / max_msgs)
                    if max_bytes:
                        used = max(used, after * avg / max_bytes)
                    if max_age and m.time is not None:
                        age = time.time() - m.time.timestamp()
                        used = max(used, age / max_age)
                self.metrics.log_retention_used.labels(label).set(round(used, 4))
                if used >= RETENTION_WARN and label not in self._retention_warned:
                    self._retention_warned.add(label)
                    log.warning("%s: the oldest uncommitted message on the log is at %.0f%% "
                                "of stream %s's retention (max_age %s s, max_bytes %s, "
                                "max_msgs %s): past 100%% retention drops it and the writer "
                                "stops; the writer is too slow or was away (discard-new "
                                "streams refuse the feeds' publishes instead)", label,
                                100 * used, g.stream, f"{max_age:g}" if max_age else "-",
                                max_bytes or "-", max_msgs or "-")
                elif used < RETENTION_WARN / 2:
                    self._retention_warned.discard(label)

        async def _lost_to_retention(self, s, a: "StreamAcks", seq: int,
                                     recv_ns: int) -> bool | None:
            """A capture stream's messages ``a.fed + 1 .. seq - 1`` missing: dropped by the
            log's retention (its first sequence past the subject's committed position + 1)?
            False: not known to be (waited for as before); True: lost and accepted (recorded,
            counted); None: lost, the writer stops."""
            from nats.js.errors import NotFoundError

            pos, pos_ns = self.log_pos.get(s.label, (0, 0))
            if pos <= 0 or self.js is None:
                return False  # nothing committed on this subject before: no position
            g = self.cfg.log
            try:
                info = await asyncio.wait_for(self.js.stream_info(g.stream), 5)
            except NotFoundError:
                return False  # (a stream deleted: said by the identity check)
            except Exception:  # noqa: BLE001 - the log away: not known, waited for
                return False
            first = info.state.first_seq
            if first <= pos + 1:
                return False
            lo, hi = a.fed + 1, seq - 1
            line = (f"{s.label}: log stream {g.stream} dropped messages no writer committed "
                    f"(retention: its first sequence is {first}, the subject's last committed "
                    f"message was at {pos}): capture stream {a.stream} messages {lo}..{hi} "
                    "are gone")
            n = hi - lo + 1
            self.metrics.log_retention_lost.inc(n)
            if not accept_loss:
                self._stop_loudly(line + "; check the feeds' spools and records, then start "
                                  "one writer with --accept-log-loss", "log retention loss")
                return None
            log.warning("%s; accepted (--accept-log-loss): recorded in feed_gaps", line)
            started = pos_ns if 0 < pos_ns <= recv_ns else recv_ns
            self.gaps.append((s.label, a.stream, _ts(started), _ts(recv_ns),
                              f"log retention dropped {n} message(s) ({lo}..{hi}) before a "
                              "writer committed them", s.gap_tokens()))
            return True

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
                elif not _same_stream(had, created) and accept_new_stream:
                    await c.execute("UPDATE stream_offsets SET committed_seq = %s, "
                                    "updated_at = now() WHERE stream = %s", (created, key))
                    log.warning("log stream %s: accepted as new (created %s; the writers "
                                "read the one created %s before)", g.stream, _iso(created),
                                _iso(had))
                    # the old stream's positions mean nothing in the new one's numbering
                    name = (g.stream.replace("\\", "\\\\").replace("%", "\\%")
                            .replace("_", "\\_"))
                    await c.execute("DELETE FROM stream_offsets WHERE stream LIKE %s "
                                    "OR stream LIKE %s", (POSITION.format(name, "%"),
                                                          POSITION_NS.format(name, "%")))
                    return NONE
                return had

            had = await _retry_db(lambda: self.side.run(check))
            if had != NONE and not _same_stream(had, created):
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
                    not _same_stream(created, self.stream_created):
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
            await self._load_position(s)
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
                    await self._accept_gaps(s.label, s.runs)
                    await s.runs.flush()
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
            await s.runs.flush()
            await driver.finish()

        async def _stream_acks(self, stream: str, label: str) -> StreamAcks:
            a = self.acks.get(stream)
            if a is None:
                committed = await _retry_db(lambda: self._committed_of(stream))
                a = self.acks[stream] = StreamAcks(stream, committed, self._ack, label,
                                                   self._committed_msg)
                self.by_stream[stream] = a  # the writer task releases it after each commit
            return a

        async def _feed(self, s, msgs) -> bool:
            """Each capture stream's records in sequence order to the driver, in runs.
            False: the consumer's delivery sequence jumped (a message delivered and lost on
            the way, a consumer reset): what follows is left for a new read from the floor."""
            runs = s.runs
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
                    stream, seq, count, recv_ns, records = decode_records(m.headers, m.data)
                except MalformedMessage as exc:
                    await self._set_aside(s, m, str(exc))
                    continue
                last = seq + count - 1
                a = await self._stream_acks(stream, s.label)
                if last <= a.fed or (seq in a.waiting and a.waiting[seq][0] >= count):
                    # committed, or fed already: a redelivery or a republish
                    if last <= a.committed:
                        self._ack([m])
                    else:
                        a.hold(last, m)
                    continue
                a.hold(last, m)  # acknowledged once its last record is committed
                if seq > a.fed + 1 and not a.waiting:
                    lost = await self._lost_to_retention(s, a, seq, recv_ns)
                    if lost is None:
                        break  # stopping: what came before the hole is still written
                    if lost:
                        a.fed = seq - 1
                if seq > a.fed + 1:
                    # ahead of the next one: a publish the feed is sending again can land
                    # after the ones that followed it; wait for it (in order or not at all)
                    a.waiting[seq] = (count, records)
                    if a.gap_since is None:
                        a.gap_since = time.monotonic()
                    continue
                await self._add(runs, a, seq, count, records)
                await self._drain_waiting(a, runs)
            await self._accept_gaps(s.label, runs)
            await runs.flush_if_due()
            return ok

        @staticmethod
        async def _add(runs: "_Runs", a: StreamAcks, seq: int, count: int, records) -> None:
            """Records from ``seq`` on, ``seq`` at or before the next one the stream wants
            (those already fed, a republish overlapping what came before, are dropped)."""
            skip = a.fed + 1 - seq
            if skip >= count:
                return
            if skip > 0:
                records = records[record_offset(records, skip):]
                seq, count = seq + skip, count - skip
            await runs.add(a, seq, count, records)

        async def _drain_waiting(self, a: StreamAcks, runs: "_Runs") -> None:
            while a.waiting:
                ready = [f for f in a.waiting if f <= a.fed + 1]
                if not ready:
                    break
                for f in sorted(ready):
                    count, records = a.waiting.pop(f)
                    await self._add(runs, a, f, count, records)
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
            body["log_retention_warned"] = sorted(self._retention_warned)
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


def _ts(ns: int):
    import datetime as dt

    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc)


#: Each replica of a clustered stream reports its own creation time: the three of a 3-node
#: stream were seen 28 ms apart, so a writer that asks another node after a failover would take
#: its stream for a re-created one.  Creation times within a second are the same stream; one
#: deleted and re-created within a second of its creation is not told apart by this check.
CREATED_SLACK_US = 1_000_000


def _same_stream(a_us: int, b_us: int) -> bool:
    """Whether two creation times (µs) are of the same stream (``CREATED_SLACK_US``)."""
    return abs(a_us - b_us) <= CREATED_SLACK_US


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

    async for attempt in stamina.retry_context(on=away, attempts=None, timeout=None,
                                               wait_initial=0.2, wait_max=5.0):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")
