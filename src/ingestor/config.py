"""Daemon settings: a TOML file decoded with msgspec, then environment, then flags.

Unknown keys are rejected with their name (``forbid_unknown_fields``), so a
typo is an error, not a silently ignored setting.  Every other setting is
checked at load too (:func:`validate`): a value the daemon would trip over
minutes later (an offset it cannot parse, a port out of range, a NaN interval)
is one line naming the key and the file, exit status 2, before anything
connects.

Feeds.  ``[[feeds]]`` tables, one per broker connection set (a broker and one
API key), so that two brokers or several keys fit one file.  The old single
``[feed]`` table still loads, as the one feed named ``kite``; both at once is
an error.  An instrument is fed by exactly one stream (which keeps ``time``
unique per instrument), so no two feeds of a broker may subscribe the same
token, and an empty ``tokens`` (every active instrument) is allowed only for a
broker's only feed.

Secrets (the API key and access token) never come from the main config: a
feed reads them from the environment or from its ``credentials_file`` (lines
``api_key=...`` / ``access_token=...``; comments and blank lines allowed,
nothing else), and they are registered for redaction.  With one feed the
environment variables are ``KITE_API_KEY`` / ``KITE_ACCESS_TOKEN`` unless the
feed names others (``api_key_env`` / ``access_token_env``).  With several
feeds nothing is implicit: each feed names its own credentials file or its own
pair of variables, and no two feeds share a source (two feeds on one key would
share, and exceed, the broker's per-key connection limit).

The log.  ``[log]`` (``LogConfig``) names NATS JetStream servers for ``ingestor run --role
feed`` / ``--role writer``; without ``servers`` it is off and ``ingestor run`` does everything
with its local spool.  Its duplicate window must cover the longest feed restart
(``max_feed_restart``), checked here with the rest.

Example (every key optional)::

    [database]
    dsn = "host=127.0.0.1 dbname=market"

    [[feeds]]
    name = "kite"                      # [a-z0-9_-]{1,32}: stream ids, labels, metrics
    broker = "kite"
    url = "wss://ws.kite.trade"
    tokens = [256265, 408065]          # empty: every active instrument
    mode = "full"                      # ltp | quote | full
    modes = { "408065" = "quote" }     # per token
    credentials_file = "/etc/ingestor/kite.env"

    [pipeline]
    flush_rows = 50000
    flush_interval = 1.0

    [sessions]                         # market hours per segment (IST), see market_hours
    commodity = "09:00-23:55@XNSE"
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

import msgspec

from ingestor.logs import register_secret

Mode = Literal["ltp", "quote", "full", "snap_quote", "depth"]
#: Kite's modes (``snap_quote`` and ``depth`` are Angel One's; its ``full`` is SNAP_QUOTE)
KITE_MODES = ("ltp", "quote", "full")
ANGEL_MODES = ("ltp", "quote", "full", "snap_quote", "depth")
#: Brokers with a feed client: Kite Connect, Angel One SmartAPI WebSocket 2.0 (SmartStream)
Broker = Literal["kite", "angel"]

#: The candle timeframes the schema stores: exactly the set of ``ohlc_candles_timeframe_check``
#: (``store/sql/0001_market_data.sql``; a test keeps the two equal).  A label outside it would
#: pass the engine and fail at the database with every flush.
#: seconds a replicated JetStream group may go without a leader after a node dies (NATS
#: 2.9's election timeout is up to 9 s, plus the time the next renewal waits): with
#: ``log.replicas`` > 1, ``lease_ttl - lease_renew`` must be at least this
LEASE_ELECTION_S = 10.0

TIMEFRAMES = ("1s", "5s", "1m", "5m", "15m", "1h", "1d")

#: A config file is a few kilobytes; reading stops here (``--config /dev/zero`` is an error,
#: not an out-of-memory).
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKEN = (1 << 32) - 1
#: Credentials used when a single feed names none.
DEFAULT_API_KEY_ENV = "KITE_API_KEY"
DEFAULT_ACCESS_TOKEN_ENV = "KITE_ACCESS_TOKEN"
CREDENTIAL_KEYS = ("api_key", "access_token")
#: Angel One: the credentials file's keys, and the variables a single Angel feed reads
ANGEL_CREDENTIAL_KEYS = ("api_key", "client_code", "jwt", "feed_token")
ANGEL_DEFAULT_ENV = ("ANGEL_API_KEY", "ANGEL_CLIENT_CODE", "ANGEL_JWT", "ANGEL_FEED_TOKEN")
#: SmartStream's limit of (token, mode) subscriptions a session
ANGEL_MAX_SUBSCRIPTIONS = 1000
#: an Angel token in ``tokens``: ``exchange:token``, the exchange by name or number
ANGEL_EXCHANGE_NAMES = {"nse_cm": 1, "nse_fo": 2, "bse_cm": 3, "bse_fo": 4, "mcx_fo": 5,
                        "ncx_fo": 7, "cde_fo": 13}

_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MiB = 1 << 20


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DatabaseConfig(_Base):
    dsn: str | None = None


class FeedConfig(_Base):
    #: short identifier in stream ids, connection labels and metrics; unique among feeds
    name: str | None = None            # (default: the broker's name)
    broker: Broker = "kite"
    #: the broker's endpoint (default: Kite's; Angel One's for ``broker = "angel"``)
    url: str | None = None
    #: Kite: instrument tokens.  Angel One: ``"exchange:token"`` strings, the exchange by
    #: SmartStream name or number (``"nse_cm:3045"``, ``"1:3045"``)
    tokens: list[int | str] = []
    mode: Mode = "full"
    modes: dict[str, Mode] = {}
    credentials_file: str | None = None
    #: environment variables holding the credentials (one feed: KITE_API_KEY /
    #: KITE_ACCESS_TOKEN when unset; several feeds: no default)
    api_key_env: str | None = None
    access_token_env: str | None = None
    #: Angel One: the variables of the client code and the feed token (the API key's and the
    #: JWT's are ``api_key_env`` / ``access_token_env``); one feed: ANGEL_API_KEY,
    #: ANGEL_CLIENT_CODE, ANGEL_JWT, ANGEL_FEED_TOKEN when unset
    client_code_env: str | None = None
    feed_token_env: str | None = None
    #: Angel One: seconds between text ``ping``s (the SmartAPI docs: 30)
    ping_interval: float = 30.0
    #: the broker's limits (Kite Connect docs: 3000 instruments per connection, 3 connections)
    tokens_per_connection: int = 3000
    max_connections: int = 3
    #: seconds without any message before reconnecting (Kite heartbeats about every second:
    #: 10; Angel One answers the ping every ``ping_interval``: 40 by default, and more than
    #: ``ping_interval``)
    heartbeat_timeout: float | None = None
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    #: delay between attempts after the broker rejects the token (HTTP 403)
    rejected_retry: float = 60.0
    connect_timeout: float = 10.0

    def __post_init__(self):
        if self.name is None:
            self.name = self.broker
        if self.url is None:
            self.url = ANGEL_URL if self.broker == "angel" else KITE_URL
        if self.heartbeat_timeout is None:
            self.heartbeat_timeout = 40.0 if self.broker == "angel" else 10.0


KITE_URL = "wss://ws.kite.trade"
ANGEL_URL = "wss://smartapisocket.angelone.in/smart-stream"


def angel_key(value: str) -> tuple[int, str]:
    """``(exchange type, token)`` of an Angel ``tokens`` entry (``"nse_cm:3045"`` or
    ``"1:3045"``); ``ValueError`` when it is not one."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("want exchange:token (nse_cm:3045)")
    exch, token = value.split(":", 1)
    exch = exch.strip().lower()
    if exch.isdigit() and int(exch) in ANGEL_EXCHANGE_NAMES.values():
        etype = int(exch)
    elif exch in ANGEL_EXCHANGE_NAMES:
        etype = ANGEL_EXCHANGE_NAMES[exch]
    else:
        raise ValueError(f"exchange {exch[:20]!r} is not one of "
                         f"{', '.join(ANGEL_EXCHANGE_NAMES)} (or their numbers)")
    if not 1 <= len(token) <= 25 or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the token: want 1 to 25 printable ASCII characters, no spaces")
    return etype, token


def angel_key_text(key: tuple[int, str]) -> str:
    """The canonical ``tokens`` entry of an Angel key (``"1:3045"``)."""
    return f"{key[0]}:{key[1]}"


def per_connection(f: "FeedConfig") -> int:
    """Subscriptions per connection: the configured number, within the broker's limit (Angel
    One: 1000 a session; the default 3000 is Kite's)."""
    if f.broker == "angel":
        return min(f.tokens_per_connection, ANGEL_MAX_SUBSCRIPTIONS)
    return f.tokens_per_connection


class PipelineConfig(_Base):
    flush_rows: int = 50_000
    #: seconds between flushes when fewer rows are pending (tick-to-commit latency).  At
    #: 150k ticks/s on 2 cores (ingestor.benchmarks.live), p50 / p99: 0.2 s gave 366 / 482 ms on
    #: PostgreSQL and 357 / 441 on TimescaleDB; 0.1 s 190 / 300 and 194 / 325; 0.05 s
    #: 110 / 191 on PostgreSQL but 174 / 448 on TimescaleDB (its per-transaction cost)
    flush_interval: float = 0.1
    #: seconds between upserts of the forming candles (readers see them grow)
    open_candle_interval: float = 1.0
    timeframes: list[str] = msgspec.field(default_factory=lambda: list(TIMEFRAMES))
    utc_offset: str = "+05:30"
    origin: str = "00:00"
    snapshot_interval: float = 1.0
    #: forming candles of timeframes at least this long are upserted every flush
    open_candles_from: str = "1m"
    #: seconds between marks of open positions to the latest prices
    mark_interval: float = 1.0


class SpoolConfig(_Base):
    dir: str = "spool"
    max_bytes: int = 2 << 30
    #: fraction of max_bytes at which the spool alarms (log + metric)
    alarm_at: float = 0.8
    segment_bytes: int = 64 << 20
    #: seconds between fsyncs of the spool
    fsync_interval: float = 0.2


class WriterConfig(_Base):
    dead_letter_dir: str = "dead-letter"
    max_rejects: int = 3
    queue_batches: int = 4
    #: TimescaleDB: each flush's instruments with at least ``direct_min_rows`` ticks go
    #: straight into the columnstore (TimescaleDB calls direct COPY experimental; false
    #: sends every tick to the rowstore, compressed later by the policy)
    direct_compress: bool = True
    direct_min_rows: int = 100
    #: write a batch's rows on a second connection while the batch before is still in its
    #: transaction (the server's second core); false: one transaction at a time
    overlap: bool = True
    #: TimescaleDB: seconds between compactions of closed tick_data chunks (0: never)
    compact_interval: float = 300.0


class MetricsConfig(_Base):
    #: host:port of the Prometheus /metrics and /healthz endpoint; "" disables it
    listen: str = "127.0.0.1:9108"


class RecordConfig(_Base):
    #: keep every connection's raw stream as capture files here, rotating at
    #: spool.segment_bytes ("": no recording; the spool deletes what is committed)
    dir: str = ""


class LogConfig(_Base):
    """``[log]``: NATS JetStream between feed and writer processes (``ingestor run --role``);
    no ``servers``: the log is off, ``ingestor run`` does everything with its local spool."""

    #: nats:// or tls:// URLs of the JetStream servers (no credentials in them)
    servers: list[str] = []
    #: the process's role when ``ingestor run`` has no ``--role``: "feed", "writer" or ""
    #: (everything in one process); one config file per process (deploy/systemd/ingestor@)
    role: str = ""
    stream: str = "INGESTOR"
    #: subjects: ``<subject_prefix>.raw.<connection label>``
    subject_prefix: str = "ingestor"
    #: 3 for a stream that survives the loss of a host (NATS 2.9 has no sync_interval)
    replicas: int = 1
    #: seconds JetStream drops a republished message id: at least ``max_feed_restart``
    duplicate_window: float = 300.0
    #: the longest a feed process is expected to be down (a crash and its restart)
    max_feed_restart: float = 120.0
    #: retention: seconds (0: no limit) and bytes (0: no limit); at the bytes limit new
    #: messages are refused (discard new: the feed keeps them in its spool), never old dropped
    max_age: float = 7 * 86400.0
    max_bytes: int = 0
    #: publishes awaiting JetStream's acknowledgement, per feed process
    max_in_flight: int = 1024
    #: seconds to wait for a publish's acknowledgement before sending again (same id)
    ack_timeout: float = 10.0
    #: the writers' durable consumer name prefix (one consumer per subject)
    consumer: str = "ingestor-writer"
    #: seconds JetStream waits for a writer's ack before redelivering (skipped then)
    ack_wait: float = 300.0
    #: messages delivered to a writer and not yet acknowledged (committed), per subject
    max_ack_pending: int = 65536
    #: a NATS credentials file (JWT + nkey seed), where the server wants one
    credentials_file: str | None = None
    #: a CA file for tls:// servers
    tls_ca_file: str | None = None
    #: leases (JetStream key-value bucket ``<stream>-leases``, its TTL this): one writer per
    #: subject, and with ``feed_lease`` one feed process per connection; a holder that has
    #: not renewed for ``lease_ttl - lease_renew`` seconds stops at once (exit 1)
    lease_ttl: float = 10.0
    #: seconds between renewals (and between a standby's attempts): at most lease_ttl / 3
    lease_renew: float = 2.0
    #: feed processes take a lease per connection (standby feeds wait for it); a feed with a
    #: lease stops receiving when it cannot reach the log for lease_ttl, one without keeps
    #: receiving into its spool
    feed_lease: bool = False
    #: the writer publishes each closed candle after its commit on
    #: ``<candles_prefix>.<timeframe>.<instrument token>`` (core NATS, JSON; README)
    publish_candles: bool = False
    #: outside ``<subject_prefix>.>`` (that is the raw log's stream)
    candles_prefix: str = "ingestor-candles"

    @property
    def enabled(self) -> bool:
        return bool(self.servers)


class Config(_Base):
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    #: the feeds (``[[feeds]]``): a list once constructed (``None`` in the file's terms is
    #: "not given": the old ``[feed]``, else one default feed)
    feeds: list[FeedConfig] | None = None
    #: the old single ``[feed]`` table: becomes ``feeds == [feed]`` (the same object); read
    #: ``feeds``
    feed: FeedConfig | None = None
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    record: RecordConfig = msgspec.field(default_factory=RecordConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    #: ``[sessions]``: per-segment market hours, ``equity = "09:15-15:30"`` or with a holiday
    #: calendar ``"09:00-23:55@XNSE"`` (``ingestor.market_hours``: the sessions and their
    #: defaults); ``INGESTOR_SESSIONS`` and ``status --session`` override them
    sessions: dict[str, Any] = {}  # values checked in _check_sessions: a message names the key
    #: shutdown budget: seconds to flush and commit after SIGTERM
    shutdown_timeout: float = 30.0

    def __post_init__(self):
        if self.feeds is None:
            self.feeds = [self.feed] if self.feed is not None else [FeedConfig()]


class ConfigError(ValueError):
    """A bad config file or setting: one line, exit status 2."""


def load(path: str | None) -> Config:
    """The settings of ``path`` (``None``: the defaults), checked: :class:`ConfigError` names
    the file and the key."""
    if path is None:
        cfg = Config()
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: "
                              "not a config file")
        try:
            cfg = msgspec.toml.decode(raw, type=Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {_validation_line(exc)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - DecodeError, and whatever a hostile file provokes
            raise ConfigError(f"{path}: not valid TOML: {_one_line(exc)}") from None
    validate(cfg, source=path)
    return cfg


def _validation_line(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `int`, got `float` - at `$.pipeline.flush_rows``` as
    ``pipeline.flush_rows: expected `int`, got `float```: the key first, as elsewhere."""
    text = _one_line(exc)
    m = re.fullmatch(r"(.*) - at `\$\.?(.*)`", text)
    what, where = m.groups() if m else (text, "")
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return f"{key}: unknown key"
    what = what.replace("`object`", "a table")
    return f"{where}: {what[:1].lower()}{what[1:]}" if where else what


def _show(value) -> str:
    """``repr(value)`` for a message, at most about 60 characters (a hostile file's value
    is not echoed whole)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def feed_key(cfg: Config, i: int) -> str:
    """How messages name feed ``i``: ``feed`` for the old single table, else ``feeds[i]``."""
    return "feed" if cfg.feed is not None else f"feeds[{i}]"


def validate(cfg: Config, source: str | None = None) -> None:
    """Check every setting (after flags changed some): :class:`ConfigError` with one line
    naming the key (and ``source``, the file, when given)."""
    try:
        _validate(cfg)
    except ConfigError as exc:
        if source is not None:
            raise ConfigError(f"{source}: {exc}") from None
        raise


def _validate(cfg: Config) -> None:
    if cfg.feed is not None and not (len(cfg.feeds) == 1 and cfg.feeds[0] is cfg.feed):
        raise ConfigError("both [feed] and [[feeds]]: keep [[feeds]] (the old [feed] is one "
                          "feed named kite)")
    if not cfg.feeds:
        raise ConfigError("feeds: at least one [[feeds]] table is needed")
    _check_pipeline(cfg.pipeline)
    _check_feeds(cfg)
    _check_storage(cfg)
    _check_log(cfg.log)
    _check_sessions(cfg.sessions)
    _number("shutdown_timeout", cfg.shutdown_timeout, 0, 3600)


def _number(key: str, value, lo, hi, *, lo_ok: bool = False, unit: str = " s") -> None:
    """``value`` a finite number in (lo, hi] (``lo_ok``: [lo, hi])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= lo if lo_ok else value > lo) and value <= hi
    if not ok:
        low = f">= {lo}" if lo_ok else f"> {lo}"
        raise ConfigError(f"{key} = {_show(value)}: must be a number {low} and <= {hi}{unit}")


def _integer(key: str, value, lo: int, hi: int, unit: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{key} = {_show(value)}: must be an integer from {lo} to {hi}{unit}")


def _check_pipeline(p: PipelineConfig) -> None:
    from ingestor import _core

    if not p.timeframes:
        raise ConfigError("pipeline.timeframes is empty: at least one of " + ", ".join(TIMEFRAMES))
    seen = set()
    for tf in p.timeframes:
        _timeframe("pipeline.timeframes", tf)
        if tf in seen:
            raise ConfigError(f"pipeline.timeframes: {_show(tf)} is listed twice")
        seen.add(tf)
    _timeframe("pipeline.open_candles_from", p.open_candles_from)
    for key, value, signed in (("pipeline.utc_offset", p.utc_offset, True),
                               ("pipeline.origin", p.origin, False)):
        try:
            if not value.strip() or not value.isascii():
                # ("" makes the core's parser fail with IndexError; its int() would take
                # other scripts' digits)
                raise ValueError
            us = _core._clock_us(value, key, signed)
        except ValueError:
            want = "[+-]HH:MM[:SS], e.g. \"+05:30\"" if signed else "HH:MM[:SS], e.g. \"09:15\""
            raise ConfigError(f"{key} = {_show(value)}: want {want}") from None
        if signed and not -86_400_000_000 < us < 86_400_000_000:
            raise ConfigError(f"{key} = {_show(value)}: not within a day of UTC")
        if not signed and not 0 <= us < 86_400_000_000:
            raise ConfigError(f"{key} = {_show(value)}: not a time of day (00:00 to 23:59:59)")
    _integer("pipeline.flush_rows", p.flush_rows, 1, 1_000_000, " rows")
    _number("pipeline.flush_interval", p.flush_interval, 0, 60)
    _number("pipeline.open_candle_interval", p.open_candle_interval, 0, 3600)
    _number("pipeline.snapshot_interval", p.snapshot_interval, 0, 86400, lo_ok=True)
    _number("pipeline.mark_interval", p.mark_interval, 0, 3600)
    try:  # what the daemon will build: anything the core refuses is refused now
        _core.Engine(timeframes=tuple(p.timeframes), utc_offset=p.utc_offset, origin=p.origin,
                     snapshot_interval_us=int(p.snapshot_interval * 1e6), tick_capacity=1,
                     candle_capacity=1, snapshot_capacity=1, instrument_capacity=1)
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"pipeline: {exc}") from None


def _timeframe(key: str, tf) -> None:
    if tf in TIMEFRAMES:
        return
    hint = ""
    try:
        from ingestor._core import timeframe_us

        same = [t for t in TIMEFRAMES if tf.isascii() and timeframe_us(t) == timeframe_us(tf)]
        if same:
            hint = f" (write {same[0]!r})"
    except (ValueError, AttributeError):
        pass
    raise ConfigError(f"{key}: {_show(tf)} is not one of the stored timeframes "
                      f"{', '.join(TIMEFRAMES)}{hint}")


def _check_feeds(cfg: Config) -> None:
    from urllib.parse import parse_qsl, urlsplit

    several = len(cfg.feeds) > 1
    names: dict[str, str] = {}
    owners: dict[tuple[str, int], str] = {}
    sources: dict[tuple, str] = {}
    all_tokens: dict[str, list[str]] = {}
    for i, f in enumerate(cfg.feeds):
        k = feed_key(cfg, i)
        if not isinstance(f.name, str) or not _NAME.fullmatch(f.name):
            raise ConfigError(f"{k}.name = {_show(f.name)}: want 1 to 32 of a-z 0-9 _ - "
                              "(it names streams, labels and metrics)")
        if f.name in names:
            raise ConfigError(f"{k}.name = {_show(f.name)}: also the name of {names[f.name]}")
        names[f.name] = k
        try:
            parts = urlsplit(f.url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ConfigError(f"{k}.url: {exc}") from None
        # (the URL is not echoed: it may carry a secret)
        if parts.username or parts.password or any(
                q.lower() in ("api_key", "access_token") for q, _ in parse_qsl(parts.query)):
            raise ConfigError(f"{k}.url carries credentials: they belong in the environment or "
                              f"{k}.credentials_file (the daemon adds them)")
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ConfigError(f"{k}.url must be a ws:// or wss:// URL with a host (scheme "
                              f"{parts.scheme[:10]!r}, host {(parts.hostname or '')[:60]!r})")
        seen = set()
        for t in f.tokens:
            if f.broker == "angel":
                try:
                    t = angel_key(t)
                except ValueError as exc:
                    raise ConfigError(f"{k}.tokens: {_show(t)}: {exc}") from None
            else:
                _integer(f"{k}.tokens", t, 1, MAX_TOKEN, " (an instrument token)")
            if t in seen:
                raise ConfigError(f"{k}.tokens: {_show(t)} is listed twice")
            seen.add(t)
            owner = owners.setdefault((f.broker, t), k)
            if owner != k:
                raise ConfigError(f"{k}.tokens: {_show(t)} is also subscribed by {owner} (broker "
                                  f"{f.broker!r}): an instrument is fed by one stream")
        all_tokens.setdefault(f.broker, []).append(k)
        modes = ANGEL_MODES if f.broker == "angel" else KITE_MODES
        for key, mode in [(None, f.mode), *f.modes.items()]:
            if mode not in modes:
                raise ConfigError(f"{k}.{'mode' if key is None else 'modes'}: {_show(mode)} is "
                                  f"not a {f.broker} mode ({', '.join(modes)})")
        for key, mode in f.modes.items():
            if f.broker == "angel":
                try:
                    etype, _ = angel_key(key)
                except ValueError as exc:
                    raise ConfigError(f"{k}.modes: key {_show(key)}: {exc}") from None
                if mode == "depth" and etype != 1:
                    raise ConfigError(f"{k}.modes: {_show(key)}: the depth mode is nse_cm "
                                      "(exchange type 1) only")
            elif not (key.isascii() and key.isdigit() and key == str(int(key))
                      and 1 <= int(key) <= MAX_TOKEN):
                raise ConfigError(f"{k}.modes: key {_show(key)} is not an instrument token "
                                  f"(1 to {MAX_TOKEN}, digits, no leading zero)")
        if f.broker == "angel":
            _number(f"{k}.ping_interval", f.ping_interval, 0, 3600)
            if isinstance(f.heartbeat_timeout, (int, float)) and \
                    f.heartbeat_timeout <= f.ping_interval:
                raise ConfigError(f"{k}.heartbeat_timeout = {f.heartbeat_timeout!r}: not more "
                                  f"than ping_interval = {f.ping_interval!r} (a quiet market's "
                                  "only message is the pong)")
        _integer(f"{k}.tokens_per_connection", f.tokens_per_connection, 1, 3000,
                 " (the broker's limit)")
        _integer(f"{k}.max_connections", f.max_connections, 1, 3, " (the broker's limit)")
        limit = per_connection(f) * f.max_connections
        if len(f.tokens) > limit:
            raise ConfigError(f"{k}.tokens: {len(f.tokens)} tokens exceed {limit} "
                              f"({f.max_connections} connections x {per_connection(f)})")
        _number(f"{k}.heartbeat_timeout", f.heartbeat_timeout, 1, 3600, lo_ok=True)
        _number(f"{k}.reconnect_min", f.reconnect_min, 0, 3600)
        _number(f"{k}.reconnect_max", f.reconnect_max, 0, 3600)
        if f.reconnect_max < f.reconnect_min:
            raise ConfigError(f"{k}.reconnect_max = {f.reconnect_max!r}: less than "
                              f"reconnect_min = {f.reconnect_min!r}")
        _number(f"{k}.rejected_retry", f.rejected_retry, 0, 86400)
        _number(f"{k}.connect_timeout", f.connect_timeout, 0, 600)
        for source_key, source in _credential_sources(f, several, k).items():
            if source in sources:
                raise ConfigError(f"{k}.{source_key}: the same credentials as {sources[source]}: "
                                  "each feed needs its own (the broker limits connections per key)")
            sources[source] = k
    for broker, keys in all_tokens.items():
        if len(keys) > 1:
            for i, f in enumerate(cfg.feeds):
                if f.broker == broker and not f.tokens:
                    raise ConfigError(f"{feed_key(cfg, i)}.tokens is empty (every active "
                                      f"instrument) but {broker!r} has {len(keys)} feeds: list "
                                      "each feed's tokens")


def _env_keys(f: FeedConfig) -> tuple[str, ...]:
    """The settings naming a feed's environment variables (Angel One has four)."""
    base = ("api_key_env", "access_token_env")
    return base + ("client_code_env", "feed_token_env") if f.broker == "angel" else base


def _credential_sources(f: FeedConfig, several: bool, k: str) -> dict[str, tuple]:
    """The feed's credential sources, keyed by the setting that names them (checked)."""
    out = {}
    if f.credentials_file:  # ("" is none, as it always was)
        out["credentials_file"] = ("file", os.path.realpath(f.credentials_file))
    keys = _env_keys(f)
    if f.broker != "angel" and (f.client_code_env or f.feed_token_env):
        raise ConfigError(f"{k}: client_code_env and feed_token_env are Angel One's "
                          "(broker = \"angel\")")
    given = [getattr(f, key) is not None for key in keys]
    if any(given) and not all(given):
        raise ConfigError(f"{k}: {', '.join(keys[:-1])} and {keys[-1]} go together (set "
                          f"{'both' if len(keys) == 2 else 'all'})")
    if all(given):
        for key in keys:
            if not _ENV_NAME.fullmatch(getattr(f, key)):
                raise ConfigError(f"{k}.{key} = {_show(getattr(f, key))}: not an environment "
                                  "variable name")
        seen: dict[str, str] = {}
        for key in keys:
            if getattr(f, key) in seen:
                raise ConfigError(f"{k}.{key}: the same variable as {seen[getattr(f, key)]}")
            seen[getattr(f, key)] = key
            out[key] = ("env", getattr(f, key))
    if several and not out:
        raise ConfigError(f"{k}: with several feeds each names its credentials: set "
                          f"credentials_file, or {', '.join(keys)}")
    return out


def _check_storage(cfg: Config) -> None:
    s, w = cfg.spool, cfg.writer
    _integer("spool.segment_bytes", s.segment_bytes, _MiB, 4 << 30, " bytes (1 MiB to 4 GiB)")
    _integer("spool.max_bytes", s.max_bytes, 16 * _MiB, 1 << 50, " bytes (16 MiB to 1 PiB)")
    if s.max_bytes < s.segment_bytes:
        raise ConfigError(f"spool.max_bytes = {s.max_bytes}: less than spool.segment_bytes = "
                          f"{s.segment_bytes}")
    _number("spool.alarm_at", s.alarm_at, 0, 1, unit=" (a fraction of spool.max_bytes)")
    _number("spool.fsync_interval", s.fsync_interval, 0, 60)
    _integer("writer.max_rejects", w.max_rejects, 1, 100)
    _integer("writer.queue_batches", w.queue_batches, 1, 64)
    _integer("writer.direct_min_rows", w.direct_min_rows, 1, 1_000_000, " rows")
    _number("writer.compact_interval", w.compact_interval, 0, 86400, lo_ok=True)
    if not s.dir:
        raise ConfigError("spool.dir is empty: name a directory (leftovers in it are replayed "
                          "at start)")
    if not w.dead_letter_dir:
        raise ConfigError("writer.dead_letter_dir is empty: name a directory")
    for key, d in (("spool.dir", s.dir), ("record.dir", cfg.record.dir),
                   ("writer.dead_letter_dir", w.dead_letter_dir)):
        if d and os.path.exists(d) and not os.path.isdir(d):
            raise ConfigError(f"{key} = {_show(d)}: exists and is not a directory")
    if cfg.record.dir and os.path.realpath(cfg.record.dir) == os.path.realpath(s.dir):
        raise ConfigError("record.dir is spool.dir: the recordings would be replayed as "
                          "leftovers at every start")
    _check_listen(cfg.metrics.listen)


_NATS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")


def _check_log(g: LogConfig) -> None:
    from urllib.parse import urlsplit

    if g.role not in ("", "feed", "writer"):
        raise ConfigError(f"log.role = {_show(g.role)}: want \"feed\", \"writer\" or \"\" "
                          "(everything in one process)")
    if g.role and not g.servers:
        raise ConfigError(f"log.role = {_show(g.role)}: needs the log: set log.servers")

    for url in g.servers:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"log.servers: {_one_line(exc)}") from None
        if parts.username or parts.password:
            raise ConfigError("log.servers: a URL carries credentials: they belong in "
                              "log.credentials_file")
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError(f"log.servers: want nats://host:port or tls://host:port (scheme "
                              f"{parts.scheme[:10]!r}, host {(parts.hostname or '')[:60]!r})")
    if not isinstance(g.stream, str) or not _NATS_NAME.fullmatch(g.stream):
        raise ConfigError(f"log.stream = {_show(g.stream)}: want 1 to 64 of A-Z a-z 0-9 _ -")
    if not isinstance(g.consumer, str) or not _NATS_NAME.fullmatch(g.consumer):
        raise ConfigError(f"log.consumer = {_show(g.consumer)}: want 1 to 64 of A-Z a-z 0-9 _ -")
    if not isinstance(g.subject_prefix, str) or not _SUBJECT.fullmatch(g.subject_prefix):
        raise ConfigError(f"log.subject_prefix = {_show(g.subject_prefix)}: want dot-separated "
                          "tokens of A-Z a-z 0-9 _ - (no wildcards)")
    _integer("log.replicas", g.replicas, 1, 5, " (JetStream's limit)")
    _number("log.duplicate_window", g.duplicate_window, 0, 7 * 86400)
    _number("log.max_feed_restart", g.max_feed_restart, 0, 7 * 86400)
    if g.duplicate_window < g.max_feed_restart:
        raise ConfigError(f"log.duplicate_window = {g.duplicate_window!r}: shorter than "
                          f"log.max_feed_restart = {g.max_feed_restart!r} (a feed restarted "
                          "after the window would double what it republishes in the log)")
    _number("log.max_age", g.max_age, 0, 10 * 365 * 86400, lo_ok=True)
    if g.max_age and g.max_age < g.duplicate_window:
        raise ConfigError(f"log.max_age = {g.max_age!r}: shorter than log.duplicate_window "
                          f"= {g.duplicate_window!r} (JetStream refuses it)")
    _integer("log.max_bytes", g.max_bytes, 0, 1 << 50, " bytes (0: no limit)")
    _integer("log.max_in_flight", g.max_in_flight, 1, 65536, " messages")
    _number("log.ack_timeout", g.ack_timeout, 0, 600)
    _number("log.ack_wait", g.ack_wait, 0, 86400)
    _integer("log.max_ack_pending", g.max_ack_pending, 1, 1 << 24, " messages")
    _number("log.lease_ttl", g.lease_ttl, 0.5, 3600)
    _number("log.lease_renew", g.lease_renew, 0, 1200)
    if g.lease_renew > g.lease_ttl / 3:
        raise ConfigError(f"log.lease_renew = {g.lease_renew!r}: more than a third of "
                          f"log.lease_ttl = {g.lease_ttl!r} (a holder must renew at least "
                          "twice before it stops itself)")
    if g.replicas > 1 and g.lease_ttl - g.lease_renew < LEASE_ELECTION_S:
        # a holder stops itself after lease_ttl - lease_renew without an acknowledged
        # renewal; a replicated lease bucket acknowledges none while it elects a leader
        raise ConfigError(f"log.lease_ttl = {g.lease_ttl!r} with log.lease_renew = "
                          f"{g.lease_renew!r} and log.replicas = {g.replicas}: a lease holder "
                          f"stops itself after {g.lease_ttl - g.lease_renew:g} s without an "
                          "acknowledged renewal, and a replicated lease bucket acknowledges none "
                          f"for up to {LEASE_ELECTION_S:g} s while it elects a leader after a "
                          "node dies; set lease_ttl to at least "
                          f"{g.lease_renew + LEASE_ELECTION_S:g}")
    for key in ("feed_lease", "publish_candles"):
        if not isinstance(getattr(g, key), bool):
            raise ConfigError(f"log.{key} = {_show(getattr(g, key))}: want true or false")
    if not isinstance(g.candles_prefix, str) or not _SUBJECT.fullmatch(g.candles_prefix):
        raise ConfigError(f"log.candles_prefix = {_show(g.candles_prefix)}: want dot-separated "
                          "tokens of A-Z a-z 0-9 _ - (no wildcards)")
    if g.candles_prefix == g.subject_prefix or \
            g.candles_prefix.startswith(g.subject_prefix + "."):
        raise ConfigError(f"log.candles_prefix = {_show(g.candles_prefix)}: inside "
                          f"log.subject_prefix = {_show(g.subject_prefix)} (the raw log's "
                          "stream would store the candles)")
    for key in ("credentials_file", "tls_ca_file"):
        path = getattr(g, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"log.{key} = {_show(path)}: not a file")


def _check_sessions(sessions: dict[str, Any]) -> None:
    from ingestor.market_hours import DEFAULT_SESSIONS, SessionError, check_item

    known = [s.name for s in DEFAULT_SESSIONS]
    for name, value in sessions.items():
        if name not in known:
            raise ConfigError(f"sessions.{_show(name)[1:-1]}: unknown session (one of "
                              f"{', '.join(known)})")
        if not isinstance(value, str):
            raise ConfigError(f"sessions.{name} = {_show(value)}: want a string "
                              f"\"HH:MM-HH:MM\" or \"HH:MM-HH:MM@CALENDAR\"")
        try:
            check_item(name, value)
        except SessionError as exc:
            raise ConfigError(f"sessions.{name} = {_show(value)}: {exc}") from None


def _check_listen(listen: str) -> None:
    if listen == "":
        return
    host, sep, port = listen.rpartition(":")
    bad = f"metrics.listen = {_show(listen)}: want host:port (port 1 to 65535) or \"\" (off)"
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(bad)
    if any(c.isspace() for c in host) or ":" in host or "[" in host:
        raise ConfigError(bad + "; an IPv4 address or a host name")
    import socket

    try:
        socket.getaddrinfo(host or "127.0.0.1", int(port), type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"metrics.listen = {_show(listen)}: host does not resolve "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


def api_env_names(cfg: Config, f: FeedConfig) -> tuple[str, str] | None:
    """The environment variables feed ``f`` reads its credentials from (``None``: none)."""
    if f.api_key_env is not None:
        return f.api_key_env, f.access_token_env
    if len(cfg.feeds) == 1:
        return DEFAULT_API_KEY_ENV, DEFAULT_ACCESS_TOKEN_ENV
    return None


def read_credentials_file(path: str, key: str = "credentials_file",
                          keys: tuple[str, ...] = CREDENTIAL_KEYS) -> dict[str, str]:
    """``api_key`` / ``access_token`` (``keys``) of a credentials file.  An unknown key or a line that is
    not ``key=value`` is a :class:`ConfigError` naming the file, the line and the key, never
    a value (values are secrets)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror}") from None
    if len(raw) > 64 * 1024:
        raise ConfigError(f"{key} {path}: larger than 64 KiB: not a credentials file")
    values: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"{key} {path}: line {n} is not key=value ("
                              + ", ".join(f"{w}=..." for w in keys) + ")")
        k, v = line.split("=", 1)
        k = k.strip()
        if k not in keys:
            shown = k if len(k) <= 40 else k[:40] + "..."
            raise ConfigError(f"{key} {path}: line {n}: unknown key {shown!r} (want "
                              f"{', '.join(keys[:-1])} or {keys[-1]})")
        if k in values:
            raise ConfigError(f"{key} {path}: line {n}: {k} given twice")
        values[k] = v.strip().strip('"').strip("'")
    return values


def credentials(cfg: Config, feed: FeedConfig | None = None, environ=None) -> tuple:
    """A feed's credentials: Kite ``(api_key, access_token)``, Angel One ``(api_key,
    client_code, jwt, feed_token)`` (:func:`angel_credentials`)."""
    f = feed if feed is not None else cfg.feeds[0]
    if f.broker == "angel":
        return angel_credentials(cfg, f, environ)
    return kite_credentials(cfg, f, environ)


def angel_credentials(cfg: Config, feed: FeedConfig | None = None,
                      environ=None) -> tuple[str, str, str, str]:
    """``(api_key, client_code, jwt, feed_token)`` of an Angel One feed: each from its
    environment variable, else its credentials file (lines ``api_key=``, ``client_code=``,
    ``jwt=``, ``feed_token=``; read, and checked, whenever it is set).  The JWT and the feed
    token expire daily: the feed reads the file again before it reconnects (a refused login,
    a dropped connection), so an operator writes fresh ones to the file (see the README)."""
    env = os.environ if environ is None else environ
    f = feed if feed is not None else cfg.feeds[0]
    k = feed_key(cfg, cfg.feeds.index(f))
    if f.api_key_env is not None:
        names = (f.api_key_env, f.client_code_env, f.access_token_env, f.feed_token_env)
    elif len(cfg.feeds) == 1:
        names = ANGEL_DEFAULT_ENV
    else:
        names = None
    values = dict.fromkeys(ANGEL_CREDENTIAL_KEYS)
    if names is not None:
        for name, var in zip(ANGEL_CREDENTIAL_KEYS, names):
            values[name] = env.get(var) or None
    if f.credentials_file:
        kept = read_credentials_file(f.credentials_file, f"{k}.credentials_file",
                                     ANGEL_CREDENTIAL_KEYS)
        for name in ANGEL_CREDENTIAL_KEYS:
            values[name] = values[name] or kept.get(name) or None
    missing = [n for n in ANGEL_CREDENTIAL_KEYS if not values[n]]
    if missing:
        ways = [" / ".join(names)] if names else []
        ways.append(f"{', '.join(ANGEL_CREDENTIAL_KEYS)} in {f.credentials_file}"
                    if f.credentials_file else f"{k}.credentials_file")
        raise ConfigError(f"{k} ({f.name}): Angel One needs the API key, client code, JWT and "
                          f"feed token ({', '.join(missing)} missing): set " + ", or ".join(ways))
    for n in ANGEL_CREDENTIAL_KEYS:  # (the client code too: it names the account)
        register_secret(values[n])
    return tuple(values[n] for n in ANGEL_CREDENTIAL_KEYS)


def kite_credentials(cfg: Config, feed: FeedConfig | None = None,
                     environ=None) -> tuple[str, str]:
    """``(api_key, access_token)`` of ``feed`` (default the only feed) from its environment
    variables, else its credentials file (the file is read, and checked, whenever it is set)."""
    env = os.environ if environ is None else environ
    f = feed if feed is not None else cfg.feeds[0]
    k = feed_key(cfg, cfg.feeds.index(f))
    names = api_env_names(cfg, f)
    key = token = None
    if names is not None:
        key, token = env.get(names[0]), env.get(names[1])
    if f.credentials_file:
        values = read_credentials_file(f.credentials_file, f"{k}.credentials_file")
        key = key or values.get("api_key")
        token = token or values.get("access_token")
    if not key or not token:
        ways = [f"{names[0]} and {names[1]}"] if names else []
        ways.append(f"api_key and access_token in {f.credentials_file}" if f.credentials_file
                    else f"{k}.credentials_file")
        raise ConfigError(f"{k} ({f.name}): the API key and access token are needed: set "
                          + ", or ".join(ways))
    register_secret(key)
    register_secret(token)
    return key, token
