"""``ingestor run``: the daemon (see ``ingestor.daemon``)."""

from __future__ import annotations

import logging

log = logging.getLogger("ingestor.run")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon",
                       description="Connect to the broker's WebSocket, ingest ticks, candles and "
                       "depth into the database, survive disconnects and database outages. "
                       "Credentials from KITE_API_KEY / KITE_ACCESS_TOKEN or feed.credentials_file.")
    p.add_argument("--config", help="TOML settings file (unknown keys are errors)")
    p.add_argument("--dsn", help="database (else INGESTOR_DSN, DATABASE_URL, the config, libpq defaults)")
    p.add_argument("--url", help="feed endpoint (default the broker's; the daemon adds api_key "
                   "and access_token)")
    p.add_argument("--tokens", help="comma-separated instrument tokens (default: the config's, "
                   "else every active instrument)")
    p.add_argument("--mode", choices=("ltp", "quote", "full"), help="mode for every token")
    p.add_argument("--metrics", help="host:port of /metrics and /healthz ('' disables)")
    p.add_argument("--spool-dir", help="spool directory")
    p.set_defaults(func=run)


def plan_tokens(cfg, dsn: str) -> dict[int, str]:
    """What to subscribe: the configured tokens, else the database's active instruments, else
    (the database away at start) the set the last run subscribed, kept beside the spool."""
    from ingestor.cli import Failure
    from ingestor.daemon import SQL_ACTIVE_TOKENS, load_subscriptions, save_subscriptions

    f = cfg.feed
    tokens = list(f.tokens)
    if not tokens:
        from ingestor.store.dsn import connect

        try:
            with connect(dsn, autocommit=True, connect_timeout=5) as setup:
                tokens = [int(r[0]) for r in setup.execute(SQL_ACTIVE_TOKENS)]
        except Exception as exc:  # noqa: BLE001 - the database may come later
            last = load_subscriptions(cfg.spool.dir)
            if not last:
                raise Failure(f"the database is not reachable ({exc}) and no earlier run left its "
                              f"subscriptions in {cfg.spool.dir}: set feed.tokens, or start once "
                              f"with the database up") from None
            log.warning("database not reachable at start: subscribing the %d instruments the "
                        "last run subscribed", len(last))
            return last
        if not tokens:
            raise Failure("no instruments to subscribe: load a dump (ingestor instruments load) "
                          "or set feed.tokens")
    limit = f.tokens_per_connection * f.max_connections
    if len(tokens) > limit:
        raise Failure(f"{len(tokens)} tokens exceed the broker's limit of {limit} "
                      f"({f.max_connections} connections x {f.tokens_per_connection} tokens)")
    planned = {t: f.modes.get(str(t), f.mode) for t in tokens}
    save_subscriptions(cfg.spool.dir, planned)
    return planned


def run(args) -> int:
    import asyncio

    from ingestor import config as config_mod
    from ingestor.cli import Failure, UsageError
    from ingestor.store.dsn import resolve_dsn

    try:
        cfg = config_mod.load(args.config)
        if args.url:
            cfg.feed.url = args.url
        if args.tokens:
            try:
                cfg.feed.tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                raise UsageError(f"--tokens: not a list of integers: {args.tokens!r}") from None
        if args.mode:
            cfg.feed.mode = args.mode
        if args.metrics is not None:
            cfg.metrics.listen = args.metrics
        if args.spool_dir:
            cfg.spool.dir = args.spool_dir
        config_mod.validate(cfg)
        api_key, token = config_mod.credentials(cfg)
    except config_mod.ConfigError as exc:
        raise UsageError(str(exc)) from None
    dsn = resolve_dsn(args.dsn, config_dsn=cfg.database.dsn)
    from ingestor.feed.spool import Spool, SpoolInUse

    spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.alarm_at, cfg.spool.segment_bytes,
                  keep_dir=cfg.record.dir, fsync_interval=cfg.spool.fsync_interval)
    try:
        spool.lock()
    except SpoolInUse as exc:
        raise Failure(str(exc)) from None
    try:
        tokens = plan_tokens(cfg, dsn)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # not on this platform
            runner = asyncio.run

        async def main():
            from ingestor.daemon import Daemon

            d = Daemon(cfg, dsn, cfg.feed.url, api_key, token, tokens, spool=spool)
            return await d.run()

        return runner(main())
    finally:
        spool.close()
