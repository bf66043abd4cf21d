"""Prometheus metrics of the daemon and its /metrics + /healthz endpoint.

``prometheus_client`` holds the metrics and renders the exposition format; a
tiny asyncio HTTP responder serves it on the daemon's own event loop (no
thread), with ``/healthz`` answering 200 while the feed is connected and the
database writable, 503 otherwise (the body says which).  Labels never carry
secrets: connection labels and reasons only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ingestor.build import core_build


class Metrics:
    def __init__(self, sessions=None) -> None:
        """``sessions``: the configuration's ``[sessions]`` (``ingestor_market_open``)."""
        r = self.registry = CollectorRegistry()
        self.ticks_written = Counter("ingestor_ticks_written", "Tick rows committed to tick_data", registry=r)
        self.candles_written = Counter("ingestor_candles_written", "Candle rows upserted", registry=r)
        self.snapshots_written = Counter("ingestor_snapshots_written", "Order-book snapshots committed", registry=r)
        self.batches = Counter("ingestor_batches", "Flush transactions by outcome", ["outcome"], registry=r)
        for outcome in BATCH_OUTCOMES:
            self.batches.labels(outcome)
        self.flush_latency = Histogram("ingestor_flush_seconds", "Flush transaction duration",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.tick_to_commit = Histogram("ingestor_tick_to_commit_seconds", "Receive time to commit of each batch's oldest tick (the longest wait in the batch)",
                                        buckets=(.01, .025, .05, .1, .15, .2, .25, .3, .35, .4, .45, .5,
                                                 .6, .75, 1, 1.5, 2.5, 5, 10, 30), registry=r)
        self.spool_bytes = Gauge("ingestor_spool_bytes", "Bytes in the spool", registry=r)
        self.spool_dropped = Gauge("ingestor_spool_dropped_messages", "Messages refused by a full spool", registry=r)
        self.spool_alarm = Gauge("ingestor_spool_alarm", "1 when the spool is near its bound", registry=r)
        self.reconnects = Counter("ingestor_feed_reconnects", "Feed reconnections", ["connection"], registry=r)
        self.feed_connected = Gauge("ingestor_feed_connected", "1 while the connection is up", ["connection"], registry=r)
        self.feed_lag = Gauge("ingestor_feed_lag_seconds", "Seconds since the connection's last message", ["connection"], registry=r)
        self.loop_lag = Gauge("ingestor_loop_lag_seconds", "Event-loop lag (late wake-up of a 100 ms timer)", registry=r)
        self.loop_lag_max = Gauge("ingestor_loop_lag_max_seconds", "Largest loop lag since start", registry=r)
        self.db_up = Gauge("ingestor_database_up", "1 when the last flush reached the database", registry=r)
        self.postbacks = Counter("ingestor_postbacks", "Text messages (order postbacks) handed on", registry=r)
        # kept by the writer itself (Writer(metrics=...)): see ingestor.store.writer
        self.dead_letters = Counter("ingestor_dead_letters", "Batches the database refused for their data, set aside to the dead-letter folder (offset committed)", registry=r)
        self.postback_dead_letters = Counter("ingestor_postback_dead_letters", "Postbacks kept in postback_dead_letters instead of applied, by kind: invalid (does not decode or is implausible), contradiction (contradicts its order), refused (by the database)", ["kind"], registry=r)
        for kind in POSTBACK_DEAD_LETTER_KINDS:
            self.postback_dead_letters.labels(kind)
        self.writer_fatal = Gauge("ingestor_writer_fatal", "1 while the writer is stopped by a fatal refusal (configuration, schema, server or code; nothing committed)", registry=r)
        # the log (NATS JetStream, ``--role feed`` / ``--role writer``; absent series stay 0)
        self.log_up = Gauge("ingestor_log_up", "1 while connected to the log (NATS JetStream)", registry=r)
        self.log_published = Counter("ingestor_log_published", "Messages JetStream acknowledged (feed role)", ["connection"], registry=r)
        self.log_resent = Counter("ingestor_log_resent", "Messages sent again after a publish was not acknowledged in time (feed role)", ["connection"], registry=r)
        self.log_oversized = Counter("ingestor_log_oversized", "Messages over the log's max_payload, not published (feed role)", registry=r)
        self.log_malformed = Counter("ingestor_log_malformed", "Messages on a raw subject that are not capture records, set aside (writer role)", registry=r)
        self.log_gaps = Counter("ingestor_log_gaps", "Runs of a capture stream's messages the writer waited for in vain and went on without (writer role)", registry=r)
        self.log_pending = Gauge("ingestor_log_pending", "Messages of the subject not yet delivered to this writer (consumer lag)", ["connection"], registry=r)
        self.log_lease = Gauge("ingestor_log_lease", "1 while this process holds the lease of the key (writer.<subject> or feed.<connection>), 0 while it waits as a standby", ["key"], registry=r)
        self.log_candles_published = Counter("ingestor_log_candles_published", "Closed candles published after their commit (writer role, log.publish_candles)", registry=r)
        self.log_retention_lost = Counter("ingestor_log_retention_lost", "Messages the log's retention dropped before any writer committed them (writer role: it stops, or goes on with --accept-log-loss)", registry=r)
        self.log_retention_used = Gauge("ingestor_log_retention_used", "How close the subject's oldest uncommitted message in the log is to the stream's retention limits (age, bytes, messages): 1 = at the limit (writer role)", ["connection"], registry=r)
        self.log_stream_replaced = Gauge("ingestor_log_stream_replaced", "1 when the log's stream was deleted and re-created under the writer (it stops)", registry=r)
        self.market = MarketCollector(sessions=sessions)
        r.register(self.market)
        from ingestor import __version__

        # the debug build of the core is several times slower: a dashboard shows which one runs
        Info("ingestor_build", "Version and core build (release, or debug: checks on, slower)",
             registry=r).info({"version": __version__, "core": core_build()})

    def attach(self, daemon) -> None:
        """Read the daemon's own counters at scrape time (see ``CoreCollector``)."""
        self.registry.register(CoreCollector(daemon))

    def render(self) -> bytes:
        return generate_latest(self.registry)


BATCH_OUTCOMES = ("written", "skipped", "dead-letter")
POSTBACK_DEAD_LETTER_KINDS = ("invalid", "contradiction", "refused")


def postback_dead_letter_kind(reason: str) -> str:
    """The metric label of a postback dead letter's reason (``ingestor.orders.store``)."""
    if reason.startswith("contradicts its order"):
        return "contradiction"
    if reason.startswith("refused by the database"):
        return "refused"
    return "invalid"
MALFORMED_REASONS = ("empty_message", "unknown_length", "truncated", "trailing_bytes", "bad_records",
                     "bad_token", "bad_time",
                     # Angel One's SmartStream decoder (SS_COUNTER_NAMES): packets set aside
                     "unknown_mode", "short", "unknown_exchange", "out_of_range",
                     "refused_token")


class CoreCollector:
    """Counters the daemon keeps anyway, read when Prometheus scrapes instead of copied into
    ``Counter`` objects on a timer: the decoders' statistics (summed over every pipeline of
    the run, so they can never lag behind or disagree with what was written) and the messages
    each connection received.  Every series exists from the start, at 0."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        d = self.daemon
        msgs = CounterMetricFamily("ingestor_messages_received", "WebSocket messages received",
                                   labels=["connection", "kind"])
        for c in d.connections:
            msgs.add_metric([c.label, "binary"], c.n_binary)
            msgs.add_metric([c.label, "text"], c.n_text)
        yield msgs
        big = CounterMetricFamily("ingestor_feed_oversized_messages",
                                  "Messages over the size limit (refused; the connection reopened)",
                                  labels=["connection"])
        for c in d.connections:
            big.add_metric([c.label], c.feed.stats.oversized if c.feed is not None else 0)
        yield big
        sp = d.spool
        for name, doc, value in (
                ("ingestor_spool_damaged", "Damaged stretches of spool records skipped on "
                 "reading back (the intact records after each read on; the file kept aside)",
                 sp.damaged),
                ("ingestor_spool_damaged_bytes", "Bytes of those damaged stretches",
                 sp.damaged_bytes),
                ("ingestor_spool_lost_records", "Records known lost to spool damage (sequence "
                 "numbers missing between intact records)", sp.lost_records)):
            yield CounterMetricFamily(name, doc, value=value)
        totals = d.decoder_totals()
        yield CounterMetricFamily("ingestor_ticks_decoded", "Packets decoded",
                                  value=totals.get("packets", 0))
        bad = CounterMetricFamily("ingestor_malformed_messages", "Malformed messages by reason",
                                  labels=["reason"])
        for reason in MALFORMED_REASONS:
            bad.add_metric([reason], totals.get(reason, 0))
        yield bad
        w = d.writer.stats
        copies = CounterMetricFamily(
            "ingestor_tick_copies", "Tick COPY statements by path: straight into TimescaleDB's "
            "columnstore, or into the rowstore (plain PostgreSQL, small flushes, backfills)",
            labels=["path"])
        rows = CounterMetricFamily("ingestor_tick_copy_rows", "Tick rows by COPY path",
                                   labels=["path"])
        for path, n, r in (("columnstore", w.direct_copies, w.direct_rows),
                           ("rowstore", w.rowstore_copies, w.rowstore_rows)):
            copies.add_metric([path], n)
            rows.add_metric([path], r)
        yield copies
        yield rows
        yield CounterMetricFamily(
            "ingestor_direct_compress_refused",
            "Direct-to-columnstore COPYs the server turned into rowstore ones (a unique index "
            "or a trigger on tick_data)", value=w.direct_refused)

    def describe(self):
        return []


class MarketCollector:
    """``ingestor_market_open{session}``: 1 while the trading session is open, by the calendar
    and hours of :mod:`ingestor.market_hours` (``sessions``: the configuration's
    ``[sessions]``; ``INGESTOR_SESSIONS`` overrides both), the
    ones ``ingestor status`` judges by.  The alerting rules that only hold in market hours
    ("no ticks for N seconds") join on it, so Prometheus needs no calendar of its own."""

    def __init__(self, environ=None, sessions=None):
        from ingestor import market_hours

        self._mh = market_hours
        self.sessions = market_hours.from_env(environ, configured=sessions)
        today = dt.datetime.now(market_hours.IST).date()
        for s in self.sessions:  # load the holiday calendars now, not in the first scrape
            s.holiday(today)

    def collect(self):
        now = dt.datetime.now(self._mh.IST)
        g = GaugeMetricFamily("ingestor_market_open", "1 while the trading session is open "
                              "(exchange holiday calendar and hours, IST)", labels=["session"])
        for s in self.sessions:
            g.add_metric([s.name], 1.0 if s.is_open(now) else 0.0)
        yield g

    def describe(self):
        return []


async def serve(host: str, port: int, metrics: Metrics, health: Callable[[], tuple[bool, dict]]):
    """Serve ``/metrics`` and ``/healthz``; returns the asyncio server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/healthz":
                ok, detail = health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(detail).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
