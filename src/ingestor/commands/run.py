"""``ingestor run``: the daemon (see ``ingestor.daemon``)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("ingestor.run")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon",
                       description="Connect to the broker's WebSocket, ingest ticks, candles and "
                       "depth into the database, survive disconnects and database outages. "
                       "Credentials from KITE_API_KEY / KITE_ACCESS_TOKEN or the feed's "
                       "credentials_file (each feed its own when there are several).")
    p.add_argument("--config", help="TOML settings file (unknown keys are errors)")
    p.add_argument("--dsn", help="database (else INGESTOR_DSN, DATABASE_URL, the config, libpq defaults)")
    p.add_argument("--url", help="the single feed's endpoint (default the broker's; the daemon "
                   "adds api_key and access_token)")
    p.add_argument("--tokens", help="comma-separated instrument tokens (default: the config's, "
                   "else every active instrument)")
    p.add_argument("--mode", choices=("ltp", "quote", "full"),
                   help="mode for every token of the single feed")
    p.add_argument("--metrics", help="host:port of /metrics and /healthz ('' disables)")
    p.add_argument("--spool-dir", help="spool directory")
    p.set_defaults(func=run)


def plan_tokens(feed, setup) -> dict[int, str]:
    """Token -> mode of one feed: its configured tokens, else every active instrument.

    Configured tokens are not registered as instruments here: a token becomes an
    instrument (``TOKEN:<n>`` until a dump names it) when the broker sends its first
    packet (the pipeline's resolve), so a mistyped or expired token in a config never
    becomes an "active instrument" that every later run subscribes."""
    from ingestor.cli import Failure

    tokens = list(feed.tokens)
    if not tokens:
        from ingestor.daemon import SQL_ACTIVE_TOKENS

        tokens = [int(r[0]) for r in setup.execute(SQL_ACTIVE_TOKENS)]
        if not tokens:
            raise Failure("no instruments to subscribe: load a dump (ingestor instruments load) "
                          f"or set the tokens of feed {feed.name!r}")
    limit = feed.tokens_per_connection * feed.max_connections
    if len(tokens) > limit:
        raise Failure(f"feed {feed.name!r}: {len(tokens)} tokens exceed the broker's limit of "
                      f"{limit} ({feed.max_connections} connections x "
                      f"{feed.tokens_per_connection} tokens)")
    return {t: feed.modes.get(str(t), feed.mode) for t in tokens}


def apply_flags(cfg, args) -> None:
    """``--url`` / ``--tokens`` / ``--mode`` set the single feed's; with several feeds they
    would be ambiguous: a usage error naming the flag."""
    from ingestor.cli import UsageError

    for flag, value in (("--url", args.url), ("--tokens", args.tokens), ("--mode", args.mode)):
        if value and len(cfg.feeds) > 1:
            raise UsageError(f"{flag}: the config has {len(cfg.feeds)} feeds "
                             f"({', '.join(f.name for f in cfg.feeds)}); set it in their "
                             "[[feeds]] tables")
    f = cfg.feeds[0]
    if args.url:
        f.url = args.url
    if args.tokens:
        try:
            f.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--tokens: not a list of integers: {args.tokens!r}") from None
    if args.mode:
        f.mode = args.mode
    if args.metrics is not None:
        cfg.metrics.listen = args.metrics
    if args.spool_dir:
        cfg.spool.dir = args.spool_dir


def run(args) -> int:
    import asyncio

    from ingestor import config as config_mod
    from ingestor.cli import Failure, UsageError
    from ingestor.store.dsn import connect, resolve_dsn
    from ingestor.store.migrate import require_current

    try:
        cfg = config_mod.load(args.config)
        apply_flags(cfg, args)
        config_mod.validate(cfg)
        creds = [config_mod.credentials(cfg, f) for f in cfg.feeds]
    except config_mod.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if len(cfg.feeds) > 1:
        # The config is checked (and every feed's credentials read); the daemon runs one
        # feed's connections so far.
        raise UsageError(f"{args.config}: feeds: {len(cfg.feeds)} feeds configured "
                         f"({', '.join(f.name for f in cfg.feeds)}); this daemon runs one "
                         "feed per config so far")
    feed = cfg.feeds[0]
    api_key, token = creds[0]
    dsn = resolve_dsn(args.dsn, config_dsn=cfg.database.dsn)
    setup = connect(dsn, autocommit=True)
    try:
        require_current(setup)
        replay_leftovers(cfg, dsn)
        tokens = plan_tokens(feed, setup)
        probe_feed(feed.url, feed.connect_timeout)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # not on this platform
            runner = asyncio.run

        async def main():
            from ingestor.daemon import Daemon

            d = Daemon(cfg, dsn, feed.url, api_key, token, tokens, setup)
            return await d.run()

        return runner(main())
    finally:
        setup.close()


def leftover_order(paths: list[str]) -> list[str]:
    """Spool segments in the order they were received: streams by their first record's
    receive time, each stream's segments by sequence number.  (Stream ids carry a random
    part, so names alone do not sort by time; replaying a later stream first would stamp
    the earlier one's ticks after it.)"""
    from ingestor.feed.capture import RECORD_HEADER, CaptureReader

    info = []
    for path in paths:
        try:
            with CaptureReader(path) as rd, open(path, "rb") as f:
                f.seek(rd.data_offset)
                head = f.read(RECORD_HEADER.size)
                first_ns = RECORD_HEADER.unpack(head)[0] if len(head) == RECORD_HEADER.size else 0
                info.append((rd.header.stream, rd.header.first_seq, first_ns, path))
        except (OSError, ValueError) as exc:
            log.error("spool file %s is unreadable (%s): left in place", path, exc)
    stream_start: dict[str, int] = {}
    for stream, first_seq, first_ns, _ in sorted(info, key=lambda x: (x[0], x[1])):
        stream_start.setdefault(stream, first_ns)
    return [p for stream, seq, _, p in
            sorted(info, key=lambda x: (stream_start[x[0]], x[0], x[1]))]


def replay_leftovers(cfg, dsn: str) -> None:
    """Spool segments a previous run left (a crash): into the database first, exactly once."""
    import glob

    from ingestor.daemon import settings_of
    from ingestor.pipeline.replay import replay

    paths = leftover_order(glob.glob(os.path.join(cfg.spool.dir, "*.cap")))
    if cfg.record.dir:
        os.makedirs(cfg.record.dir, exist_ok=True)
    for path in paths:
        r = replay(path, dsn, settings=settings_of(cfg), progress=False,
                   dead_letter_dir=cfg.writer.dead_letter_dir)
        log.info("replayed spool %s left by an earlier run: %d ticks (%d messages already committed)",
                 os.path.basename(path), r.ticks, r.skipped_messages)
        if cfg.record.dir:  # part of the raw recording
            os.replace(path, os.path.join(cfg.record.dir, os.path.basename(path)))
        else:
            os.unlink(path)


def probe_feed(url: str, timeout: float) -> None:
    """Fail fast, with one line, when the feed's host does not answer at all."""
    import socket
    from urllib.parse import urlsplit

    from ingestor.cli import Failure

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise Failure(f"cannot reach the feed at {parts.scheme}://{parts.hostname}:{port}: "
                      f"{exc.strerror or exc}") from None
