"""``ingestor run``: the daemon (see ``ingestor.daemon``)."""

from __future__ import annotations

import logging

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
    p.add_argument("--role", choices=("feed", "writer"),
                   help="with [log] configured: feed (broker -> spool -> JetStream) or writer "
                   "(JetStream -> pipeline -> database); default: the config's log.role, else "
                   "everything in one process")
    p.add_argument("--accept-new-log-stream", action="store_true",
                   help="(--role writer) the log's stream was deleted and re-created: an "
                   "operator checked what the old one held; read the new one")
    p.set_defaults(func=run)


def plan_tokens(feed, active: list[int] | None, last: dict[int, str] | None) -> dict[int, str]:
    """Token -> mode of one feed: its configured tokens, else every active instrument (None:
    the database was not reachable), else the set the feed subscribed last time (``last``).

    Configured tokens are not registered as instruments here: a token becomes an
    instrument (``TOKEN:<n>`` until a dump names it) when the broker sends its first
    packet (the pipeline's resolve), so a mistyped or expired token in a config never
    becomes an "active instrument" that every later run subscribes."""
    from ingestor.cli import Failure

    tokens = list(feed.tokens)
    if not tokens:
        if active is None:
            if not last:
                raise Failure(f"feed {feed.name!r}: the database is not reachable and no earlier "
                              "run left its subscriptions beside the spool: set the feed's "
                              "tokens, or start once with the database up")
            log.warning("database not reachable at start: feed %s subscribes the %d instruments "
                        "the last run subscribed", feed.name, len(last))
            return dict(last)
        tokens = active
        if not tokens:
            raise Failure("no instruments to subscribe: load a dump (ingestor instruments load) "
                          f"or set the tokens of feed {feed.name!r}")
    limit = feed.tokens_per_connection * feed.max_connections
    if len(tokens) > limit:
        raise Failure(f"feed {feed.name!r}: {len(tokens)} tokens exceed the broker's limit of "
                      f"{limit} ({feed.max_connections} connections x "
                      f"{feed.tokens_per_connection} tokens)")
    return {t: feed.modes.get(str(t), feed.mode) for t in tokens}


def active_tokens(dsn: str) -> list[int] | None:
    """The database's active instruments, or None when it does not answer (yet)."""
    from ingestor.daemon import SQL_ACTIVE_TOKENS
    from ingestor.store.dsn import connect

    try:
        with connect(dsn, autocommit=True, connect_timeout=5) as setup:
            return [int(r[0]) for r in setup.execute(SQL_ACTIVE_TOKENS)]
    except Exception as exc:  # noqa: BLE001 - the database may come later: the daemon waits
        log.warning("database not reachable at start (%s)", exc)
        return None


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
    from ingestor.daemon import FeedPlan, load_subscriptions, save_subscriptions
    from ingestor.feed.spool import Spool, SpoolInUse
    from ingestor.store.dsn import resolve_dsn

    try:
        cfg = config_mod.load(args.config)
        apply_flags(cfg, args)
        config_mod.validate(cfg)
        role = getattr(args, "role", None) or cfg.log.role or None
        if getattr(args, "accept_new_log_stream", False) and role != "writer":
            raise config_mod.ConfigError("--accept-new-log-stream: only with --role writer")
        if role and not cfg.log.enabled:
            raise config_mod.ConfigError(f"--role {role}: needs the log: set log.servers in "
                                         "the config ([log] table)")
        # a writer reads the log, not the broker: it needs no broker credentials
        creds = [config_mod.credentials(cfg, f) if role != "writer" else ("", "")
                 for f in cfg.feeds]
    except config_mod.ConfigError as exc:
        raise UsageError(str(exc)) from None
    dsn = resolve_dsn(args.dsn, config_dsn=cfg.database.dsn)
    spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.alarm_at, cfg.spool.segment_bytes,
                  keep_dir=cfg.record.dir, fsync_interval=cfg.spool.fsync_interval)
    try:
        spool.lock()
    except SpoolInUse as exc:
        raise Failure(str(exc)) from None
    try:
        active = None if all(f.tokens for f in cfg.feeds) else active_tokens(dsn)
        last = load_subscriptions(cfg.spool.dir) or {}
        plans = []
        for feed, (api_key, token) in zip(cfg.feeds, creds):
            tokens = plan_tokens(feed, active, last.get(feed.name))
            plans.append(FeedPlan(feed, api_key, token, tokens))
        save_subscriptions(cfg.spool.dir, {p.feed.name: p.tokens for p in plans})
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # not on this platform
            runner = asyncio.run

        async def main():
            from ingestor.daemon import Daemon

            if role == "feed":
                from ingestor.feed.jetstream import feed_role

                return await feed_role(cfg, dsn, plans, spool).run()
            if role == "writer":
                from ingestor.pipeline.log_source import writer_role

                return await writer_role(cfg, dsn, plans, spool, accept_new_stream=getattr(
                    args, "accept_new_log_stream", False)).run()
            return await Daemon(cfg, dsn, plans, spool=spool).run()

        from ingestor.metrics import warn_debug_build

        warn_debug_build("ingestor run")  # once everything is checked: not before an error line
        return runner(main())
    finally:
        spool.close()
