"""NATS JetStream as the log between feed and writer processes (``[log]``).

The embedded daemon (``ingestor run``) keeps every received message in its
local spool.  With ``[log]`` configured, ``ingestor run --role feed`` appends
each message, unchanged, to a JetStream stream, and ``ingestor run --role
writer`` (``ingestor.pipeline.log_source``) consumes it into the database.

Subjects and payload (what another program reads)::

    <subject_prefix>.raw.<connection label>     e.g. ingestor.raw.kite-0

    payload   one or more capture records, in sequence order, each
                  recv_ns u64 LE | kind u8 | length u32 LE | the broker's message (length bytes)
              (the broker's WebSocket messages exactly as received; kind 1 binary, 2 text:
              an order postback or broker message)
    headers   Nats-Msg-Id       "<capture stream>:<first seq>-<last seq>" (the records' place:
                                the stream id of that connection's life, their sequence
                                numbers, consecutive)
              Ingestor-Records  how many records (last seq - first seq + 1)
              Ingestor-Recv-Ns  the last record's receive time, ns since the Unix epoch (UTC)

Several records per NATS message: a Kite message of 100 ticks is about 18 KB, and the
client's, the server's and the writer's cost per NATS message was a third of the log's
overhead at 240k ticks/s.  The writer also reads the single-record messages of earlier
versions (``Nats-Msg-Id: <stream>:<seq>``, ``Ingestor-Kind``, the payload the broker's
message itself).  A record can be in the log twice (a feed restarted after JetStream's
duplicate window, or killed in the milliseconds between a publish and its spool writing
down where that message ended): a reader skips the (capture stream, seq) it has seen; the
writer does.  ``encode_headers`` /
``decode_message`` / ``decode_records``.

The feed side (:class:`Publisher`): a connection's spool streams, oldest first
(an earlier run's leftovers before the live stream), are read as the pipeline
would read them and published with at most ``max_in_flight`` publishes awaiting
JetStream's acknowledgement; a stream is released from the spool only up to the
last message JetStream acknowledged, in order.  A publish not acknowledged in
``ack_timeout`` (a server down, a leader moving) is sent again *with every
message after it*, in order and with the same ids: JetStream drops those it
already stored (within ``duplicate_window``), so the log keeps each
connection's order; the writer skips anything at or below what it committed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from ingestor.feed.capture import KIND_BINARY, KIND_TEXT, RECORD_HEADER, iter_records
from ingestor.feed.lease import Lease, holder_id

log = logging.getLogger(__name__)

HDR_MSG_ID = "Nats-Msg-Id"
HDR_RECV_NS = "Ingestor-Recv-Ns"
HDR_KIND = "Ingestor-Kind"
HDR_RECORDS = "Ingestor-Records"
#: records in one NATS message at most (a batch is also bounded by the server's max_payload)
MAX_RECORDS = 1 << 16
_KINDS = {"1": KIND_BINARY, "2": KIND_TEXT}
#: a capture stream id as a message names it (the stream_offsets key): printable, bounded
_STREAM = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_MAX_SEQ = 1 << 62
_MAX_NS = (1 << 64) - 1
#: room kept for the headers under the server's max_payload
_HEADER_ROOM = 256
#: bytes of publishes awaiting acknowledgement at most (what the client buffers while the
#: log is away is bounded by its pending_size too)
MAX_IN_FLIGHT_BYTES = 32 << 20


class MalformedMessage(ValueError):
    """A message on a raw subject that is not a capture record (its reason)."""


def subject_of(prefix: str, label: str) -> str:
    """The raw subject of a connection (its label: ``<feed name>-<n>``)."""
    return f"{prefix}.raw.{label}"


def label_of_stream(stream: str) -> str:
    """The connection label a capture stream id starts with (``<label>-<12 hex>``)."""
    return stream.rsplit("-", 1)[0]


def encode_headers(stream: str, seq: int, recv_ns: int, kind: int) -> dict[str, str]:
    """The headers of a single-record message of earlier versions (its payload the record's);
    the writer still reads them (``decode_records``)."""
    return {HDR_MSG_ID: f"{stream}:{seq}", HDR_RECV_NS: str(recv_ns), HDR_KIND: str(kind)}


def encode_batch_headers(stream: str, first: int, last: int, last_recv_ns: int) -> dict[str, str]:
    """The headers of a message holding records ``first..last`` of ``stream``."""
    return {HDR_MSG_ID: f"{stream}:{first}-{last}", HDR_RECORDS: str(last - first + 1),
            HDR_RECV_NS: str(last_recv_ns)}


def _seq(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or int(text) >= _MAX_SEQ:
        raise MalformedMessage("the sequence number is not an integer from 0 to 2^62")
    return int(text)


def _recv(recv) -> int:
    if not (isinstance(recv, str) and recv.isascii() and recv.isdigit() and len(recv) <= 20) \
            or int(recv) > _MAX_NS:
        raise MalformedMessage(f"{HDR_RECV_NS} is not an unsigned 64-bit integer")
    return int(recv)


def _msg_id(headers: dict, form: str) -> tuple[str, str]:
    """The capture stream a message's id names, and what follows it (``form``: the id's
    shape, for the reason)."""
    mid = headers.get(HDR_MSG_ID)
    if not isinstance(mid, str) or ":" not in mid:
        raise MalformedMessage(f"no {HDR_MSG_ID} {form}")
    stream, _, rest = mid.rpartition(":")
    if not _STREAM.fullmatch(stream):
        raise MalformedMessage("the stream id is not 1 to 128 of A-Z a-z 0-9 _ . -")
    return stream, rest


def decode_message(headers: dict | None) -> tuple[str, int, int, int]:
    """``(stream, seq, recv_ns, kind)`` of a single-record message's headers, or
    :class:`MalformedMessage` saying what is wrong (never another exception)."""
    if not isinstance(headers, dict):
        raise MalformedMessage("no headers")
    recv, kind = headers.get(HDR_RECV_NS), headers.get(HDR_KIND)
    stream, seq_text = _msg_id(headers, "<stream>:<seq>")
    seq = _seq(seq_text)
    recv_ns = _recv(recv)
    if kind not in _KINDS:
        raise MalformedMessage(f"{HDR_KIND} is not 1 (binary) or 2 (text)")
    return stream, seq, recv_ns, _KINDS[kind]


def decode_records(headers: dict | None, data: bytes) -> tuple[str, int, int, int, bytes]:
    """``(stream, first seq, count, first record's recv_ns, records)`` of a raw message of
    either format (``records``: its capture records, format 1, as a spool chunk holds them),
    or :class:`MalformedMessage` saying what is wrong (never another exception)."""
    if not isinstance(headers, dict):
        raise MalformedMessage("no headers")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage("no payload")
    if HDR_RECORDS not in headers:
        stream, seq, recv_ns, kind = decode_message(headers)
        return stream, seq, 1, recv_ns, RECORD_HEADER.pack(recv_ns, kind, len(data)) + data
    count = headers.get(HDR_RECORDS)
    stream, span = _msg_id(headers, "<stream>:<first>-<last>")
    first_text, dash, last_text = span.partition("-")
    if not dash:
        raise MalformedMessage(f"{HDR_MSG_ID} has no <first>-<last> range")
    first, last = _seq(first_text), _seq(last_text)
    n = last - first + 1
    if not 1 <= n <= MAX_RECORDS:
        raise MalformedMessage(f"the range {first}-{last} does not hold 1 to {MAX_RECORDS} "
                               "records")
    if count != str(n):
        raise MalformedMessage(f"{HDR_RECORDS} does not match the range {first}-{last}")
    _recv(headers.get(HDR_RECV_NS))
    # the records must fill the payload exactly, each of a known kind
    pos, size, total, k = 0, RECORD_HEADER.size, len(data), 0
    unpack = RECORD_HEADER.unpack_from
    recv0 = 0
    while pos < total:
        if pos + size > total:
            raise MalformedMessage(f"record {k} is cut off in its header")
        recv_ns, kind, length = unpack(data, pos)
        if kind not in (KIND_BINARY, KIND_TEXT):
            raise MalformedMessage(f"record {k} is of kind {kind}, not 1 or 2")
        if k == 0:
            recv0 = recv_ns
        pos += size + length
        k += 1
    if pos != total:
        raise MalformedMessage(f"record {k - 1} runs past the payload's end")
    if k != n:
        raise MalformedMessage(f"the payload holds {k} records, {HDR_RECORDS} says {n}")
    return stream, first, n, recv0, bytes(data)


# -- connection and stream --------------------------------------------------------


async def connect(cfg, name: str):
    """A NATS connection to ``cfg.servers`` (``[log]``), reconnecting for ever once up."""
    import nats

    opts = dict(servers=list(cfg.servers), name=name, max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, connect_timeout=5, allow_reconnect=True,
                # publishes made while reconnecting are buffered up to this, then refused
                pending_size=64 << 20)
    if cfg.credentials_file:
        opts["user_credentials"] = cfg.credentials_file
    if cfg.tls_ca_file:
        import ssl

        opts["tls"] = ssl.create_default_context(cafile=cfg.tls_ca_file)

    async def said(exc):  # the client's own reconnect loop; one line, no traceback
        log.warning("log (NATS): %s", type(exc).__name__ + (f": {exc}" if str(exc) else ""))

    async def down():
        log.warning("log (NATS): disconnected; reconnecting")

    async def up():
        log.info("log (NATS): reconnected")

    return await nats.connect(error_cb=said, disconnected_cb=down, reconnected_cb=up, **opts)


async def connect_retrying(cfg, name: str, stop: asyncio.Event):
    """:func:`connect`, retried with backoff until it succeeds (None: ``stop`` was set)."""
    import stamina

    said = False
    async for attempt in stamina.retry_context(on=Exception, attempts=None, timeout=None,
                                               wait_initial=0.2, wait_max=5.0):
        with attempt:
            if stop.is_set():
                return None
            try:
                return await connect(cfg, name)
            except Exception as exc:
                if not said:
                    log.warning("log (NATS) not reachable yet (%s: %s); retrying",
                                type(exc).__name__, exc)
                    said = True
                raise
    return None


def stream_config(cfg):
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    return StreamConfig(name=cfg.stream, subjects=[f"{cfg.subject_prefix}.>"],
                        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                        num_replicas=cfg.replicas, duplicate_window=cfg.duplicate_window,
                        max_age=cfg.max_age or None, max_bytes=cfg.max_bytes or -1,
                        discard=DiscardPolicy.NEW)


class LogSetupError(RuntimeError):
    """The log's stream exists with settings that break a guarantee (said, not changed)."""


async def ensure_stream(js, cfg):
    """The stream, created when missing; an existing one is checked: its duplicate window
    at least ``log.duplicate_window``, its subjects covering ours (:class:`LogSetupError`
    otherwise: an operator's stream is not changed behind their back)."""
    from nats.js.errors import BadRequestError, NotFoundError

    try:
        info = await js.stream_info(cfg.stream)
    except NotFoundError:
        try:
            info = await js.add_stream(stream_config(cfg))
        except BadRequestError as exc:
            if exc.err_code == 10065:  # JSStreamSubjectOverlapErr: never cured by waiting
                raise LogSetupError(f"log stream {cfg.stream}: its subjects "
                                    f"{cfg.subject_prefix}.> overlap another stream's on the "
                                    "servers (set log.subject_prefix or log.stream)") from None
            raise
        log.info("log: created stream %s (subjects %s.>, %d replica(s), duplicate window %.0f s)",
                 cfg.stream, cfg.subject_prefix, cfg.replicas, cfg.duplicate_window)
        return info
    have = info.config.duplicate_window or 0
    if have + 1e-6 < cfg.duplicate_window:
        raise LogSetupError(f"log stream {cfg.stream}: its duplicate_window is {have:.0f} s, "
                            f"log.duplicate_window wants {cfg.duplicate_window:.0f} s (a feed "
                            "restarted after the window doubles in the log)")
    subjects = info.config.subjects or []
    if f"{cfg.subject_prefix}.>" not in subjects:
        raise LogSetupError(f"log stream {cfg.stream}: its subjects {subjects} do not include "
                            f"{cfg.subject_prefix}.>")
    return info


# -- the feed side ------------------------------------------------------------------


class _Entry:
    __slots__ = ("sp", "first", "seq", "payload", "headers", "fut")

    def __init__(self, sp, first, seq, payload, headers):
        #: records ``first..seq`` of ``sp`` (None payload: one record set aside, oversized)
        self.sp, self.first, self.seq, self.payload, self.headers = sp, first, seq, payload, headers
        self.fut = None


class Publisher:
    """One connection's spool streams into its subject, a bounded number of publishes in
    flight (and of bytes: ``MAX_IN_FLIGHT_BYTES``), each stream released from the spool up
    to what JetStream acknowledged.  Each publish carries the consecutive records of a spool
    chunk up to the server's ``max_payload``.

    Parameters
    ----------
    js : JetStreamContext
        Made with ``publish_async_max_pending`` above ``max_in_flight`` (the bound is kept
        here, so that nothing is sent while a resend is under way).
    subject : str
    cfg : LogConfig
    metrics : Metrics, optional
    """

    def __init__(self, js, subject: str, cfg, label: str, metrics=None, max_payload: int = 1 << 20):
        self.js = js
        self.subject = subject
        self.cfg = cfg
        self.label = label
        self.metrics = metrics
        self.max_payload = max_payload
        self.window: collections.deque[_Entry] = collections.deque()
        self.window_bytes = 0
        #: a leftover's records kept for the next chunk (an earlier run's message goes on)
        self._carry: dict = {}
        self._has_window = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._emptied = asyncio.Event()
        self._room = asyncio.Event()
        #: records published and acknowledged
        self.published = 0
        #: NATS messages acknowledged (records set aside as oversized are not sent)
        self.messages = 0
        #: records acknowledged as already stored (JetStream's duplicate window at work: a
        #: resend, a leftover republished in the same messages)
        self.duplicates = 0
        self.resent = 0
        self.oversized = 0
        #: the receive time (ns) of the last message acknowledged in order (0: none yet)
        self.acked_ns = 0

    async def _send(self, e: _Entry) -> None:
        # the common case first, without the retry machinery (a retry context per message
        # was a tenth of the feed process's CPU at 240k ticks/s)
        try:
            e.fut = await self.js.publish_async(self.subject, e.payload, headers=e.headers)
            return
        except Exception:  # noqa: BLE001 - taken again below, with backoff
            pass
        import stamina

        # a client that cannot take the message now (buffer full while reconnecting) is
        # waited for; the message is not acknowledged until it is stored
        async for attempt in stamina.retry_context(on=Exception, attempts=None, timeout=None,
                                                   wait_initial=0.1, wait_max=2.0):
            with attempt:
                e.fut = await self.js.publish_async(self.subject, e.payload, headers=e.headers)

    async def publish_chunk(self, sp, chunk, first_seq: int) -> None:
        """Publish the records of a spool chunk (``StreamSpool.take``) in order, as few NATS
        messages as the server's ``max_payload`` allows; a leftover of an earlier run in the
        messages that run published (``sp.batch_ends``: the same ids, which JetStream's
        duplicate window recognises), a message cut by the chunk's end kept for the next."""
        carried = self._carry.pop(sp, None)
        if carried is not None:
            chunk, first_seq = carried[0] + chunk, carried[1]
        mv = memoryview(chunk)
        limit = self.max_payload - _HEADER_ROOM
        stream = sp.stream
        ends = sp.batch_ends
        seq = first_seq
        start = end = 0  # the batch being gathered: chunk[start:end], records batch_first..
        batch_first, last_ns = seq, 0
        for off, length, recv_ns, kind in iter_records(chunk):
            rec_start = off - RECORD_HEADER.size
            rec_end = off + length
            if rec_end - rec_start > limit:
                if end > start:
                    await self._put(sp, batch_first, seq - 1, mv[start:end], last_ns)
                self._oversized(stream, seq, length)
                await self._put(sp, seq, seq, None, 0)
                start = end = rec_end
                seq += 1
                batch_first = seq
                continue
            if rec_end - start > limit or seq - batch_first >= MAX_RECORDS:
                await self._put(sp, batch_first, seq - 1, mv[start:end], last_ns)
                start, batch_first = rec_start, seq
            end, last_ns = rec_end, recv_ns
            if seq in ends:  # an earlier run's message ended here
                await self._put(sp, batch_first, seq, mv[start:end], last_ns)
                start, batch_first = end, seq + 1
            seq += 1
        if end > start:
            if sp.batch_end_max >= seq:
                # an earlier run's message goes on in the next chunk
                self._carry[sp] = (bytes(mv[start:end]), batch_first)
            else:
                await self._put(sp, batch_first, seq - 1, mv[start:end], last_ns)

    async def flush_carried(self, sp) -> None:
        """A leftover read to its end: what was kept for an earlier run's message goes as it
        is (the rest of that message was not in the spool)."""
        carried = self._carry.pop(sp, None)
        if carried is not None:
            sp.batch_ends, sp.batch_end_max = frozenset(), -1
            await self.publish_chunk(sp, carried[0], carried[1])

    def _oversized(self, stream: str, seq: int, length: int) -> None:
        # the server would refuse it for ever: set aside (counted, said), not a stall
        self.oversized += 1
        if self.metrics is not None:
            self.metrics.log_oversized.inc()
        log.error("%s: message %s:%d of %d bytes exceeds the log's max_payload (%d): "
                  "not published (raise max_payload on the NATS servers)",
                  self.label, stream, seq, length, self.max_payload)

    async def _put(self, sp, first: int, last: int, payload, last_ns: int) -> None:
        """Publish records ``first..last`` of ``sp`` (``payload``: their capture records, a
        slice of the chunk; None: one record set aside)."""
        if payload is None:
            e = _Entry(sp, first, last, None, None)
            e.fut = asyncio.get_running_loop().create_future()
            e.fut.set_result(None)
        else:
            # bytes only when the slice is not the whole chunk
            data = payload.obj if len(payload) == len(payload.obj) else bytes(payload)
            e = _Entry(sp, first, last, data,
                       encode_batch_headers(sp.stream, first, last, last_ns))
        sp.mark(last)
        size = len(e.payload) if e.payload is not None else 0
        while self.window and (len(self.window) >= self.cfg.max_in_flight
                               or self.window_bytes + size > MAX_IN_FLIGHT_BYTES):
            self._room.clear()
            await self._room.wait()
        # sent and put in the window under the lock: the window is the order sent, and
        # nothing new is sent while a resend is under way (the log keeps the order)
        async with self._send_lock:
            if e.payload is not None:
                await self._send(e)
            self.window.append(e)
            self.window_bytes += size
        self._has_window.set()

    async def drain(self) -> None:
        """Until every published message is acknowledged."""
        while self.window:
            self._emptied.clear()
            await self._emptied.wait()

    async def acks(self) -> None:
        """The acknowledgements, in order: release the spool up to each; a publish not
        acknowledged in time (or refused) is sent again with everything after it (same ids),
        after a pause that grows while it keeps failing."""
        timeout = self.cfg.ack_timeout
        failures = 0
        while True:
            if not self.window:
                self._emptied.set()
                self._has_window.clear()
                await self._has_window.wait()
                continue
            head = self.window[0]
            try:
                await asyncio.wait_for(asyncio.shield(head.fut), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a timeout, no stream, a refusal: resend
                failures += 1
                await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
                await self._resend(exc, say=failures == 1 or failures % 30 == 0)
                continue
            failures = 0
            done = self._pop_done()
            if self.metrics is not None and done:
                self.metrics.log_published.labels(self.label).inc(done)

    def _pop_done(self) -> int:
        records, last = 0, None
        w = self.window
        while w and w[0].fut.done() and not w[0].fut.cancelled() and w[0].fut.exception() is None:
            last = w.popleft()
            records += last.seq - last.first + 1
            if last.payload is not None:
                self.window_bytes -= len(last.payload)
                self.messages += 1
            ack = last.fut.result()
            if ack is not None and ack.duplicate:
                # stored before (a resend)
                self.duplicates += last.seq - last.first + 1
            if w and w[0].sp is not last.sp:
                last.sp.release(last.seq)
        if last is not None:
            last.sp.release(last.seq)
            self._room.set()
            if last.headers is not None:
                self.acked_ns = int(last.headers[HDR_RECV_NS])
        self.published += records
        return records

    def _cancel_pending(self) -> None:
        # a cancelled future gives its place back to the client's in-flight bound
        for e in self.window:
            if e.fut is None:
                continue
            if not e.fut.done():
                e.fut.cancel()
            elif not e.fut.cancelled():
                e.fut.exception()  # (retrieved: sent again below, not an unseen error)

    async def _resend(self, exc: BaseException, say: bool = True) -> None:
        # (the acknowledgement task) first free the in-flight places, so that a sender
        # waiting for one (holding the lock) goes on and lets go of the lock
        self._cancel_pending()
        async with self._send_lock:
            self._cancel_pending()
            n = len(self.window)
            head = self.window[0]
            if say:  # (the first of a run of failures, then one in 30)
                log.warning("%s: publish of %s:%d not acknowledged (%s); sending it and the "
                            "%d after it again", self.label, head.sp.stream, head.seq,
                            type(exc).__name__ + (f": {exc}" if str(exc) else ""), n - 1)
            # every one from the head on, acknowledged or not: JetStream drops the ids it
            # has, and a message stored after one that was lost is stored again after it
            for e in list(self.window):
                if e.payload is not None:
                    await self._send(e)
            self.resent += n
            if self.metrics is not None:
                self.metrics.log_resent.labels(self.label).inc(n)


async def publish_streams(pub: Publisher, streams, wakeup: asyncio.Event, stop: asyncio.Event,
                          on_done=None, linger: float = 0.005) -> None:
    """A connection's spool streams (``streams()``: oldest first) through ``pub`` until
    ``stop`` is set and every stream is consumed and acknowledged (``drive_streams``'s walk,
    with the log in place of the pipeline)."""
    while True:
        wakeup.clear()
        progressed = False
        for sp in list(streams()):
            got = sp.take()
            if got is None:
                if sp.consumed:
                    await pub.flush_carried(sp)
                    if sp.recovered:
                        await pub.drain()
                        log.info("%s: leftover stream %s republished (%d record(s) the "
                                 "log had stored before, dropped by its duplicate window; the "
                                 "writers skip any other they committed)", pub.label,
                                 sp.stream, pub.duplicates)
                    if on_done is not None:
                        on_done(sp)
                    continue
                break  # the oldest stream has nothing yet: later ones wait for it
            chunk, seq = got
            await pub.publish_chunk(sp, chunk, seq)
            progressed = True
            break
        if progressed:
            if not stop.is_set():
                await asyncio.sleep(linger)  # gathers a busy feed's messages into chunks
            continue
        if stop.is_set() and all(sp.consumed for sp in streams()):
            break
        try:
            await asyncio.wait_for(wakeup.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    await pub.drain()


# -- the feed role ---------------------------------------------------------------------


def feed_role(cfg, dsn, plans, spool):
    """``ingestor run --role feed``: the daemon's feeds and spool, the log in place of the
    pipeline and writer (the database only records feed gaps)."""
    from ingestor.daemon import Daemon

    class FeedRole(Daemon):
        def __init__(self):
            super().__init__(cfg, dsn, plans, spool)
            self.nc = None
            self.publishers: dict[str, Publisher] = {}
            self.metrics.log_up.set_function(
                lambda: 1 if self.nc is not None and self.nc.is_connected else 0)
            self.holder = holder_id("feed")
            self.leases: dict[str, Lease] = {}
            self._keepers: list[asyncio.Task] = []
            #: the lease bucket, once the log answers (``log.feed_lease``)
            self.kv = None
            self._kv_ready = asyncio.Event()

        async def _run_feed(self, conn) -> None:
            """With ``log.feed_lease``: the connection's lease first (a standby waits here,
            not connected to the broker); a gap from the previous holder's last renewal to
            this connection is recorded in ``feed_gaps``."""
            g = self.cfg.log
            if not g.feed_lease:
                return await super()._run_feed(conn)
            waiter = asyncio.ensure_future(self._kv_ready.wait())
            stopper = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            if self.stop.is_set():
                return
            lease = Lease(self.kv, f"feed.{conn.label}", g, self.holder, f"feed {conn.label}",
                          metrics=self.metrics,
                          stream_of=lambda: conn.streams[-1].stream if conn.streams else "",
                          acked_of=lambda: getattr(self.publishers.get(conn.label),
                                                   "acked_ns", 0))
            self.leases[conn.label] = lease
            if not await lease.take(self.stop):
                return
            if lease.previous is not None and conn.gap_start is None:
                # from what the previous holder had in the log at its last renewal (what it
                # received after that may be lost with it), or its last renewal if earlier
                since = lease.previous_since_ns
                acked = lease.previous.acked_ns
                if acked > 0 and (since is None or acked < since):
                    since = acked
                conn.gap_start = (lease.previous.stream or None, since,
                                  f"feed process {lease.previous.holder} stopped renewing "
                                  "its lease; a standby took over")
            self._keepers.append(asyncio.get_running_loop().create_task(
                lease.keep(), name=f"lease-{conn.label}"))
            await super()._run_feed(conn)

        def _on_connect(self, conn, stream: str) -> None:
            super()._on_connect(conn, stream)
            lease = self.leases.get(conn.label)
            if lease is not None and lease.held:
                lease.renew_soon()  # the lease names the new stream (a standby's gap row)

        async def _prepare_early(self) -> None:
            return  # no pipeline in this process

        async def _compact(self) -> None:
            return

        async def _mark_to_market(self) -> None:
            return

        async def _pipelines(self) -> None:
            """Publish every connection's streams (an earlier run's leftovers first)."""
            g = self.cfg.log
            self.nc = await connect_retrying(g, "ingestor-feed", self.stop)
            if self.nc is None:
                return
            js = self.nc.jetstream(publish_async_max_pending=2 * g.max_in_flight + 16)
            if await _retry_setup(lambda: ensure_stream(js, g), self.stop) is None:
                return  # stopped first: the spool keeps everything for the next start
            if g.feed_lease:
                from ingestor.feed.lease import lease_bucket

                self.kv = await _retry_setup(lambda: lease_bucket(js, g), self.stop)
                if self.kv is None:
                    return
                self._kv_ready.set()
            max_payload = self.nc.max_payload or (1 << 20)
            lefts: dict[str, list] = {}
            for sp in self.leftovers:
                lefts.setdefault(label_of_stream(sp.stream), []).append(sp)
            async with asyncio.TaskGroup() as tg:
                for conn in self.connections:
                    mine = lefts.pop(conn.label, [])
                    tg.create_task(self._publish(
                        js, conn.label, max_payload, lambda m=mine, c=conn: [*m, *c.streams],
                        conn.wakeup,
                        lambda sp, m=mine, c=conn: (m if sp in m else c.streams).remove(sp)),
                        name=f"log-{conn.label}")
                for label, mine in lefts.items():  # a connection no longer configured
                    tg.create_task(self._publish(js, label, max_payload, lambda m=mine: m,
                                                 asyncio.Event(), lambda sp, m=mine: m.remove(sp),
                                                 ended=True),
                                   name=f"log-{label}")

        async def _publish(self, js, label, max_payload, streams, wakeup, on_done,
                           ended: bool = False) -> None:
            pub = Publisher(js, subject_of(self.cfg.log.subject_prefix, label), self.cfg.log,
                            label, self.metrics, max_payload)
            self.publishers[label] = pub
            self.metrics.log_published.labels(label)
            self.metrics.log_resent.labels(label)
            stop = self.stop
            if ended:
                stop = asyncio.Event()
                stop.set()
            sender = asyncio.create_task(publish_streams(pub, streams, wakeup, stop, on_done),
                                         name=f"log-send-{label}")
            acker = asyncio.create_task(pub.acks(), name=f"log-acks-{label}")
            try:
                done, _ = await asyncio.wait({sender, acker},
                                             return_when=asyncio.FIRST_COMPLETED)
                if acker in done:
                    sender.cancel()
                    acker.result()
                    raise RuntimeError("the acknowledgement task ended")
                sender.result()
            finally:
                for t in (sender, acker):
                    t.cancel()

        def _readiness(self) -> tuple[bool, str]:
            """Ready once every connection receives or waits as a standby (another process
            holds its lease, ``log.feed_lease``): under ``Type=notify`` a standby is a started
            service, not a start that hangs.  Its state is the log's, not the database's."""
            standby = {k for k, v in self.leases.items() if v.standby}
            receiving = [bool(c.feed is not None and c.feed.stats.connected)
                         for c in self.connections]
            log_up = self.nc is not None and self.nc.is_connected
            status = (f"receiving on {sum(receiving)} of {len(receiving)} connection(s); "
                      + (f"standby for {len(standby)} (another process holds the lease); "
                         if standby else "")
                      + ("log connected" if log_up else "log away: spooling"))
            return all(r or c.label in standby
                       for r, c in zip(receiving, self.connections)), status

        def health(self):
            ok, body = super().health()
            log_up = self.nc is not None and self.nc.is_connected
            # no database work here but feed gaps: the database's state is not the feed's
            ok = (all(body["feeds"].values()) and log_up and not body["spool_alarm"]
                  and body["spool_error"] is None and body["failed"] is None
                  and not body["spool_damaged"]["stretches"])
            body["role"] = "feed"
            body["log"] = log_up
            body["log_in_flight"] = {k: len(p.window) for k, p in self.publishers.items()}
            if self.cfg.log.feed_lease:
                body["leases"] = {k: ("active" if v.held else "standby")
                                  for k, v in self.leases.items()}
                # a standby is healthy while it waits (its feeds are not connected by design)
                ok = (log_up and not body["spool_alarm"] and body["spool_error"] is None
                      and body["failed"] is None and not body["spool_damaged"]["stretches"]
                      and all(body["feeds"][k] for k, v in self.leases.items() if v.held))
            return ok, body

        async def run(self) -> int:
            try:
                return await super().run()
            finally:
                for t in self._keepers:
                    t.cancel()
                for lease in self.leases.values():  # published and stopped: a standby may go
                    await lease.release()
                if self.nc is not None:
                    await _close(self.nc)

    return FeedRole()


async def _retry_setup(fn, stop: asyncio.Event):
    """``await fn()`` retried while the log does not answer (a server starting, a cluster
    electing); a :class:`LogSetupError` (a stream set up against a guarantee) is raised."""
    import stamina

    said = False
    # (the predicate sees whatever ends an attempt, a cancellation too: that is not retried)
    def retried(exc: BaseException) -> bool:
        return isinstance(exc, Exception) and not isinstance(exc, LogSetupError)

    async for attempt in stamina.retry_context(on=retried, attempts=None, timeout=None,
                                               wait_initial=0.2, wait_max=5.0):
        with attempt:
            if stop.is_set():
                return None
            try:
                return await fn()
            except Exception as exc:
                if not said and not isinstance(exc, LogSetupError):
                    log.warning("log (NATS) stream not ready (%s: %s); retrying",
                                type(exc).__name__, exc)
                    said = True
                raise
    return None


async def _close(nc) -> None:
    try:
        await nc.flush(timeout=5)  # the last acknowledgements reach the server
    except Exception:  # noqa: BLE001 - closing anyway
        pass
    try:
        await nc.close()
    except Exception:  # noqa: BLE001
        pass
