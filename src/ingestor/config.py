"""Daemon settings: a TOML file decoded with msgspec, then environment, then flags.

Unknown keys are rejected with their name (``forbid_unknown_fields``), so a
typo is an error, not a silently ignored setting.  Secrets (the Kite API key
and access token) come from the environment (``KITE_API_KEY``,
``KITE_ACCESS_TOKEN``) or a file named by ``feed.credentials_file`` (two
lines ``api_key=...`` / ``access_token=...``, or a TOML table with those
keys), never from the main config, and are registered for redaction.

Example (every key optional)::

    [database]
    dsn = "host=127.0.0.1 dbname=market"

    [feed]
    url = "wss://ws.kite.trade"
    tokens = [256265, 408065]        # empty: every active instrument
    mode = "full"                      # ltp | quote | full
    modes = { "408065" = "quote" }     # per token
    credentials_file = "/etc/ingestor/kite.toml"

    [pipeline]
    flush_rows = 50000
    flush_interval = 1.0
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from ingestor.logs import register_secret

Mode = Literal["ltp", "quote", "full"]


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DatabaseConfig(_Base):
    dsn: str | None = None


class FeedConfig(_Base):
    url: str = "wss://ws.kite.trade"
    tokens: list[int] = []
    mode: Mode = "full"
    modes: dict[str, Mode] = {}
    credentials_file: str | None = None
    #: the broker's limits (Kite Connect docs: 3000 instruments per connection, 3 connections)
    tokens_per_connection: int = 3000
    max_connections: int = 3
    #: seconds without any message (the broker heartbeats about every second) before reconnecting
    heartbeat_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    #: delay between attempts after the broker rejects the token (HTTP 403)
    rejected_retry: float = 60.0
    connect_timeout: float = 10.0


class PipelineConfig(_Base):
    flush_rows: int = 50_000
    #: seconds between flushes when fewer rows are pending (tick-to-commit latency)
    flush_interval: float = 0.2
    #: seconds between upserts of the forming candles (readers see them grow)
    open_candle_interval: float = 1.0
    timeframes: list[str] = msgspec.field(default_factory=lambda: ["1s", "5s", "1m", "5m", "15m", "1h", "1d"])
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


class MetricsConfig(_Base):
    #: host:port of the Prometheus /metrics and /healthz endpoint; "" disables it
    listen: str = "127.0.0.1:9108"


class RecordConfig(_Base):
    #: keep every connection's raw stream as capture files here, rotating at
    #: spool.segment_bytes ("": no recording; the spool deletes what is committed)
    dir: str = ""


class Config(_Base):
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    feed: FeedConfig = msgspec.field(default_factory=FeedConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    writer: WriterConfig = msgspec.field(default_factory=WriterConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    record: RecordConfig = msgspec.field(default_factory=RecordConfig)
    #: shutdown budget: seconds to flush and commit after SIGTERM
    shutdown_timeout: float = 30.0


class ConfigError(ValueError):
    """A bad config file or setting: one line, exit status 2."""


def load(path: str | None) -> Config:
    if path is None:
        cfg = Config()
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        try:
            cfg = msgspec.toml.decode(raw, type=Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    from ingestor._core import timeframe_us

    p, f, s = cfg.pipeline, cfg.feed, cfg.spool
    for tf in p.timeframes + [p.open_candles_from]:
        try:
            timeframe_us(tf)
        except ValueError as exc:
            raise ConfigError(f"pipeline: {exc}") from None
    for k in f.modes:
        if not k.isdigit():
            raise ConfigError(f"feed.modes: key {k!r} is not an instrument token")
    checks = [
        (p.flush_rows >= 1, "pipeline.flush_rows must be >= 1"),
        (p.flush_interval > 0, "pipeline.flush_interval must be > 0"),
        (p.open_candle_interval > 0, "pipeline.open_candle_interval must be > 0"),
        (p.snapshot_interval >= 0, "pipeline.snapshot_interval must be >= 0"),
        (1 <= f.tokens_per_connection <= 3000, "feed.tokens_per_connection must be 1..3000 (the broker's limit)"),
        (1 <= f.max_connections <= 3, "feed.max_connections must be 1..3 (the broker's limit)"),
        (f.heartbeat_timeout > 0, "feed.heartbeat_timeout must be > 0"),
        (0 < f.reconnect_min <= f.reconnect_max, "feed.reconnect_min must be > 0 and <= reconnect_max"),
        (s.max_bytes > 0 and 0 < s.alarm_at <= 1, "spool.max_bytes must be > 0 and spool.alarm_at in (0, 1]"),
        (s.segment_bytes > 0, "spool.segment_bytes must be > 0"),
        (cfg.shutdown_timeout > 0, "shutdown_timeout must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if not f.url.startswith(("ws://", "wss://")):
        raise ConfigError(f"feed.url must be a ws:// or wss:// URL, not {f.url!r}")


def credentials(cfg: Config, environ=None) -> tuple[str, str]:
    """``(api_key, access_token)`` from the environment or the credentials file."""
    env = os.environ if environ is None else environ
    key, token = env.get("KITE_API_KEY"), env.get("KITE_ACCESS_TOKEN")
    path = cfg.feed.credentials_file
    if (not key or not token) and path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ConfigError(f"feed.credentials_file {path}: {exc.strerror}") from None
        values = {}
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                values[k.strip()] = v.strip().strip('"').strip("'")
        key = key or values.get("api_key")
        token = token or values.get("access_token")
    if not key or not token:
        raise ConfigError("the Kite API key and access token are needed: set KITE_API_KEY and "
                          "KITE_ACCESS_TOKEN, or feed.credentials_file")
    register_secret(key)
    register_secret(token)
    return key, token
