"""Leases in JetStream's key-value store: one holder per writer subject or feed connection.

Why the key-value store: it is JetStream itself (no second system to run), replicated
like the log (``log.replicas``), and it gives the two operations a lease needs:

* **take** -- ``create(key)``: stored only if the key has no value (a JetStream publish
  with ``Nats-Expected-Last-Subject-Sequence: 0``);
* **renew** -- ``update(key, last=revision)``: stored only if nobody wrote the key since
  this holder's last write (compare-and-set on the revision).

Expiry is the bucket's TTL (the stream's ``max_age``, ``log.lease_ttl``): NATS 2.9
ignores per-key TTLs, so every key of ``<stream>-leases`` has the same one.  A holder
that stops renewing (killed, hung, cut off) loses its key ``lease_ttl`` after its last
renewal, and a standby, trying ``create`` every ``lease_renew`` seconds, takes it then.

Fencing: a holder continues only while its own last write is the key's revision.  A
renewal refused (another revision: someone took over) or none acknowledged for
``lease_ttl - lease_renew`` seconds (since the renewal was *sent*, which is before the
server stored it and started its TTL) ends the process at once, as a SIGKILL would:
a feed drops its broker connection with it (two feeds on one connection would double the
data), a writer commits nothing more.  What was not committed stays where a SIGKILL leaves
it (the feed's spool, the log), and the process's supervisor restarts it as a standby.
The clock is the local monotonic clock against the server's, with ``lease_renew`` of
margin; a writer stalled past that margin (a frozen machine) is caught by the last fence,
the database: each batch locks its stream's ``stream_offsets`` row and is skipped (or
stops the writer) when another writer committed past its first message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import msgspec

log = logging.getLogger(__name__)


class LeaseValue(msgspec.Struct, omit_defaults=True):
    """The value a holder writes (JSON): who holds it, and for a feed connection the capture
    stream it is receiving and the receive time (ns) of the last message JetStream
    acknowledged (everything received before it is in the log): a standby that takes over
    records the gap against them."""

    holder: str
    stream: str = ""
    acked_ns: int = 0


def holder_id(role: str) -> str:
    return f"{role}@{socket.gethostname()[:64]}:{os.getpid()}"


def bucket_name(cfg) -> str:
    return f"{cfg.stream}-leases"


async def lease_bucket(js, cfg):
    """The lease bucket, created when missing (TTL ``log.lease_ttl``, ``log.replicas``); an
    existing one with another TTL is a :class:`LogSetupError` (every holder must agree)."""
    from nats.js.api import KeyValueConfig, StorageType
    from nats.js.errors import BucketNotFoundError, NotFoundError

    from ingestor.feed.jetstream import LogSetupError

    name = bucket_name(cfg)
    try:
        kv = await js.key_value(name)
    except (BucketNotFoundError, NotFoundError):
        kv = await js.create_key_value(KeyValueConfig(
            bucket=name, history=1, ttl=cfg.lease_ttl, replicas=cfg.replicas,
            storage=StorageType.FILE, description="ingestor leases (writer subjects, feeds)"))
        log.info("log: created lease bucket %s (TTL %.1f s)", name, cfg.lease_ttl)
        return kv
    info = await js.stream_info(f"KV_{name}")
    have = info.config.max_age or 0
    if abs(have - cfg.lease_ttl) > 1e-3:
        raise LogSetupError(f"lease bucket {name}: its TTL is {have:g} s, log.lease_ttl is "
                            f"{cfg.lease_ttl:g} s (every process must use the same: set it, or "
                            "delete the bucket while no process runs)")
    return kv


def _lost_exit(what: str) -> None:  # pragma: no cover - ends the process
    logging.shutdown()
    os._exit(1)


class Lease:
    """One key's lease.  ``await take(stop)`` waits until held (False: ``stop`` first);
    ``await keep()`` renews until cancelled, and calls ``on_lost`` (by default: end the
    process at once) when the lease cannot be kept."""

    def __init__(self, kv, key: str, cfg, holder: str, what: str, on_lost=None, metrics=None,
                 stream_of=None, acked_of=None):
        self.kv, self.key, self.cfg = kv, key, cfg
        self.holder, self.what = holder, what
        self.on_lost = on_lost or _lost_exit
        self.metrics = metrics
        self.revision: int | None = None
        self.sent_at = 0.0
        #: for a feed: the capture stream it receives (written with each renewal)
        self.stream_of = stream_of or (lambda: "")
        #: for a feed: the receive time of the last message JetStream acknowledged (0: none)
        self.acked_of = acked_of or (lambda: 0)
        #: the holder seen last while waiting, its capture stream, and when (ns) its last
        #: renewal was at the earliest (a standby records the gap from there)
        self.previous: LeaseValue | None = None
        self.previous_since_ns: int | None = None
        #: waiting in :meth:`take` because another holder has the key (not for the log away)
        self.standby = False
        self._nudge = asyncio.Event()

    def renew_soon(self) -> None:
        """Renew now rather than at the next interval (the value changed: a feed's new
        capture stream, which a standby taking over names in the gap it records)."""
        self._nudge.set()

    def _value(self) -> bytes:
        return msgspec.json.encode(LeaseValue(self.holder, self.stream_of() or "",
                                               int(self.acked_of() or 0)))

    @property
    def held(self) -> bool:
        return self.revision is not None

    async def take(self, stop: asyncio.Event) -> bool:
        from nats.js.errors import (APIError, KeyNotFoundError, KeyWrongLastSequenceError,
                                    NoStreamResponseError)

        said = False
        seen_rev = None
        #: the send time of the first attempt whose outcome is unknown (it may have landed)
        unsure: float | None = None
        while not stop.is_set():
            sent = time.monotonic()
            try:
                self.revision = await self.kv.create(self.key, self._value())
                # this attempt created the key: no earlier one holds it (it would have been
                # refused), so the TTL runs from this one (an earlier send time, from before
                # an outage longer than the TTL, had its holder stop at its first renewal)
                self.sent_at = sent
                if self.previous is not None:
                    log.warning("%s: took over the lease from %s (not renewed for %.1f s)",
                                self.what, self.previous.holder, self.cfg.lease_ttl)
                else:
                    log.info("%s: lease taken (%s)", self.what, self.key)
                self.standby = False
                self._gauge(1)
                return True
            except KeyWrongLastSequenceError:
                try:
                    e = await self.kv.get(self.key)
                    if unsure is not None and self._mine(e.value):
                        # an earlier attempt that timed out did land: held since then
                        self.revision, self.sent_at = e.revision, unsure
                        log.info("%s: lease taken (%s)", self.what, self.key)
                        self.standby = False
                        self._gauge(1)
                        return True
                    if e.revision != seen_rev:
                        # a renewal landed since the last look: the earliest it can have been
                        seen_rev = e.revision
                        self.previous_since_ns = time.time_ns() - int(
                            self.cfg.lease_renew * 1e9)
                        try:
                            self.previous = msgspec.json.decode(e.value, type=LeaseValue)
                        except msgspec.DecodeError:
                            self.previous = LeaseValue(holder="(unreadable)")
                except KeyNotFoundError:
                    pass  # expired between the two: try again at once
                    continue
                self.standby = True
                if not said:
                    log.info("%s: standby: the lease is held by %s; waiting", self.what,
                             self.previous.holder if self.previous else "another process")
                    said = True
            except Exception as exc:  # noqa: BLE001 - the log away: keep trying
                # a refusal (no stream answering: a replica group electing its leader; an
                # error reply) stored nothing; a timeout or a lost connection may have
                if unsure is None and not isinstance(exc, (NoStreamResponseError, APIError)):
                    unsure = sent
                log.warning("%s: cannot reach the lease bucket (%s: %s); retrying", self.what,
                            type(exc).__name__, exc)
            self._gauge(0)
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.lease_renew)
            except asyncio.TimeoutError:
                pass
        return False

    async def keep(self) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        g = self.cfg
        limit = g.lease_ttl - g.lease_renew
        while True:
            try:
                await asyncio.wait_for(self._nudge.wait(), max(
                    0.0, self.sent_at + g.lease_renew - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self._nudge.clear()
            sent = time.monotonic()
            if sent - self.sent_at >= limit:
                return self._lose(f"no renewal acknowledged for {limit:.1f} s")
            try:
                rev = await asyncio.wait_for(
                    self.kv.update(self.key, self._value(), last=self.revision),
                    timeout=self.sent_at + limit - sent)
            except KeyWrongLastSequenceError:
                # a renewal that timed out may have landed: the key then holds our own value
                rev = await self._own_revision()
                if rev is None:
                    return self._lose("another process holds it now")
                self.revision = rev  # (sent_at stays the older, surer time)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the log away: tried again until the limit
                log.warning("%s: lease renewal failed (%s: %s)", self.what, type(exc).__name__,
                            exc)
                await asyncio.sleep(min(0.2, g.lease_renew / 4))
                continue
            self.revision, self.sent_at = rev, sent

    def _mine(self, value: bytes) -> bool:
        try:
            return msgspec.json.decode(value, type=LeaseValue).holder == self.holder
        except msgspec.DecodeError:
            return False

    async def _own_revision(self) -> int | None:
        """The key's revision if its value is this holder's own (else None)."""
        try:
            e = await asyncio.wait_for(self.kv.get(self.key), timeout=self.cfg.lease_renew)
        except Exception:  # noqa: BLE001 - unknown: not ours for sure
            return None
        return e.revision if self._mine(e.value) else None

    def _lose(self, why: str) -> None:
        self.revision = None
        self._gauge(0)
        log.error("%s: lease lost (%s): stopping at once; what is not committed stays in the "
                  "spool and the log", self.what, why)
        self.on_lost(self.what)

    def _gauge(self, v: int) -> None:
        if self.metrics is not None:
            try:
                self.metrics.log_lease.labels(self.key).set(v)
            except Exception:  # noqa: BLE001 - metrics never stop a lease
                pass

    async def release(self) -> None:
        """Give the lease up (an orderly stop): a standby takes it at its next try."""
        if self.revision is None:
            return
        try:
            await self.kv.delete(self.key, last=self.revision)
        except Exception:  # noqa: BLE001 - it expires anyway
            pass
        self.revision = None
