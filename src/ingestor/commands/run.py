"""``ingestor run``: the daemon (see ``ingestor.daemon``)."""

from __future__ import annotations

import logging

log = logging.getLogger("ingestor.run")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon",
                       description="Connect to the broker's WebSocket, ingest ticks, candles and "
                       "depth into the database, survive disconnects and database outages. "
                       "Credentials from KITE_API_KEY / KITE_ACCESS_TOKEN (Angel One: ANGEL_API_KEY, "
                       "ANGEL_CLIENT_CODE, ANGEL_JWT, ANGEL_FEED_TOKEN) or the feed's "
                       "credentials_file (each feed its own when there are several).")
    p.add_argument("--config", help="TOML settings file (unknown keys are errors)")
    p.add_argument("--dsn", help="database (else INGESTOR_DSN, DATABASE_URL, the config, libpq defaults)")
    p.add_argument("--url", help="the single feed's endpoint (default the broker's; the daemon "
                   "adds api_key and access_token)")
    p.add_argument("--tokens", help="comma-separated instrument tokens (Angel One: "
                   "exchange:token, e.g. nse_cm:3045; default: the config's, else every active "
                   "instrument)")
    p.add_argument("--mode", choices=("ltp", "quote", "full", "snap_quote", "depth"),
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
    p.add_argument("--accept-log-loss", action="store_true",
                   help="(--role writer) messages the log's retention dropped before any writer "
                   "committed them: record each loss in feed_gaps and go on (without it the "
                   "writer stops)")
    p.set_defaults(func=run)


def plan_tokens(feed, active, last: dict | None) -> dict:
    """Token -> mode of one feed: its configured tokens, else every active instrument of its
    broker (None: the database was not reachable), else the set the feed subscribed last
    time (``last``).  Kite's tokens are integers; Angel One's ``(exchange type, token)``.

    Configured tokens are not registered as instruments here: a token becomes an
    instrument (``TOKEN:<n>`` until a dump names it) when the broker sends its first
    packet (the pipeline's resolve), so a mistyped or expired token in a config never
    becomes an "active instrument" that every later run subscribes."""
    from ingestor.cli import Failure
    from ingestor.config import angel_key, per_connection

    angel = feed.broker == "angel"
    if isinstance(active, dict):
        active = active.get(feed.broker)
    if last:
        last = {t: m for t, m in last.items() if isinstance(t, tuple) == angel}
    tokens = [angel_key(t) for t in feed.tokens] if angel else list(feed.tokens)
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
            load = "OpenAPIScripMaster.json" if angel else "a dump"
            raise Failure(f"no instruments to subscribe: load {load} (ingestor instruments load) "
                          f"or set the tokens of feed {feed.name!r}")
    limit = per_connection(feed) * feed.max_connections
    if len(tokens) > limit:
        raise Failure(f"feed {feed.name!r}: {len(tokens)} tokens exceed the broker's limit of "
                      f"{limit} ({feed.max_connections} connections x "
                      f"{per_connection(feed)} tokens)")
    if not angel:
        return {t: feed.modes.get(str(t), feed.mode) for t in tokens}
    modes = {angel_key(k): m for k, m in feed.modes.items()}
    plan = {t: modes.get(t, feed.mode) for t in tokens}
    from ingestor.feed.smartstream import check_subscriptions

    items = sorted(plan.items())
    per = per_connection(feed)
    for i in range(0, len(items), per):
        try:
            check_subscriptions(dict(items[i:i + per]))
        except ValueError as exc:
            raise Failure(f"feed {feed.name!r}: {exc}") from None
    return plan


def active_tokens(dsn: str) -> dict | None:
    """The database's active instruments by broker (Kite's tokens; Angel One's (exchange
    type, token)), or None when it does not answer (yet)."""
    from ingestor.daemon import SQL_ACTIVE_ANGEL, SQL_ACTIVE_TOKENS
    from ingestor.store.dsn import connect

    try:
        with connect(dsn, autocommit=True, connect_timeout=5) as setup:
            return {"kite": [int(r[0]) for r in setup.execute(SQL_ACTIVE_TOKENS)],
                    "angel": [(int(e), str(t)) for e, t in setup.execute(SQL_ACTIVE_ANGEL)]}
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
        if f.broker == "angel":  # exchange:token, checked with the rest of the config
            f.tokens = [t.strip() for t in args.tokens.split(",") if t.strip()]
        else:
            try:
                f.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                raise UsageError(f"--tokens: not a list of integers: {args.tokens!r}") from None
    if args.mode:
        f.mode = args.mode  # (checked against the broker's modes with the rest)
    if args.metrics is not None:
        cfg.metrics.listen = args.metrics
    if args.spool_dir:
        cfg.spool.dir = args.spool_dir


def _angel_refresh(cfg, feed):
    """The Angel feed's credentials read again (the JWT and feed token expire daily): the
    feed calls it before it reconnects."""
    from ingestor import config as config_mod

    def refresh() -> tuple[str, str]:
        _, _, jwt, feed_token = config_mod.angel_credentials(cfg, feed)
        return jwt, feed_token
    return refresh


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
        if getattr(args, "accept_log_loss", False) and role != "writer":
            raise config_mod.ConfigError("--accept-log-loss: only with --role writer")
        if role and not cfg.log.enabled:
            raise config_mod.ConfigError(f"--role {role}: needs the log: set log.servers in "
                                         "the config ([log] table)")
        # a writer reads the log, not the broker: it needs no broker credentials
        creds = [config_mod.credentials(cfg, f) if role != "writer"
                 else ("",) * (4 if f.broker == "angel" else 2) for f in cfg.feeds]
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
        for feed, cred in zip(cfg.feeds, creds):
            tokens = plan_tokens(feed, active, last.get(feed.name))
            if feed.broker == "angel":
                api_key, client_code, jwt, feed_token = cred
                plans.append(FeedPlan(feed, api_key, jwt, tokens, client_code=client_code,
                                      feed_token=feed_token,
                                      refresh=_angel_refresh(cfg, feed)))
            else:
                plans.append(FeedPlan(feed, *cred, tokens))
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

                return await writer_role(
                    cfg, dsn, plans, spool,
                    accept_new_stream=getattr(args, "accept_new_log_stream", False),
                    accept_loss=getattr(args, "accept_log_loss", False)).run()
            return await Daemon(cfg, dsn, plans, spool=spool).run()

        from ingestor.build import warn_debug_build

        warn_debug_build("ingestor run")  # once everything is checked: not before an error line
        from ingestor.memory import limit_arenas

        limit_arenas()  # before the daemon's threads start (ingestor.memory says why)
        return runner(main())
    finally:
        spool.close()
