"""``ingestor migrate``: apply the schema, set up TimescaleDB where present, create roles.

Applies the pending ``sql/`` migrations in order (under an advisory lock; recorded in
``schema_migrations``), then -- with ``--timescale auto`` (default) when the server has
TimescaleDB, or ``on`` -- makes the time-series tables hypertables with columnstore and
retention policies, and with ``--roles`` creates the reader and writer roles and their
grants.  Every step is idempotent: running it again changes nothing, or applies changed
settings.  ``--check`` only reports whether the schema is current (exit 1 if not).
``--compat 001,...`` creates (again) the reference schemas' compatibility views and their
read-only roles (``ingestor.store.compat``), ``--drop-compat`` drops them; with
``--login-users`` also a login user per schema, its password from the environment.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

TABLES = ("tick_data", "ohlc_candles", "order_book_snapshots")
_OFF = ("off", "none", "never")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "migrate", help="apply sql/ migrations (and TimescaleDB set-up, roles)",
        description=__doc__.split("\n\n")[1] if "\n\n" in __doc__ else None)
    p.add_argument("--dsn", help="database (default: INGESTOR_DSN, DATABASE_URL, libpq defaults)")
    p.add_argument("--timescale", choices=("auto", "on", "off"), default="auto",
                   help="use TimescaleDB: when available (auto), required (on), never (off)")
    p.add_argument("--roles", action="store_true",
                   help="create the reader/writer roles (idempotent) and grant them")
    p.add_argument("--reader-role", default=None, metavar="NAME",
                   help="read-only role for services (default ingestor_reader)")
    p.add_argument("--writer-role", default=None, metavar="NAME",
                   help="role for the daemon (default ingestor_writer)")
    for flag, what in (("--chunk-interval", "hypertable chunk interval"),
                       ("--compress-after", "age before chunks go to the columnstore, or off"),
                       ("--retention", "age after which chunks are dropped, or off")):
        p.add_argument(flag, action="append", default=[], metavar="[TABLE=]INTERVAL",
                       help=f"{what}; TABLE one of {', '.join(TABLES)} (default: all); "
                            "repeatable")
    p.add_argument("--continuous-aggregate", action="store_true",
                   help="also create tick_data_daily (TimescaleDB; filled by its refresh policy)")
    p.add_argument("--compat", metavar="LIST",
                   help="create the reference schemas' compatibility views: 001,002,003,004 "
                        "(any subset) or all; idempotent (see docs/compat.md)")
    p.add_argument("--drop-compat", metavar="LIST",
                   help="drop these compatibility schemas (001,... or all)")
    p.add_argument("--compat-timeframe", action="append", default=[], metavar="CODE=TF",
                   help="timeframe behind market_data of 001 or 004 (default 1m); repeatable")
    p.add_argument("--compat-exchanges", action="append", default=[], metavar="CODE=EX[,EX]",
                   help="show only these exchanges' instruments in a compatibility schema "
                        "(default: all); repeatable")
    p.add_argument("--compat-account-filter", metavar="LIST",
                   help="in these compatibility schemas, orders and fills only of the account "
                        "the session names in app.current_user_id (default: every account)")
    p.add_argument("--login-users", metavar="LIST",
                   help="with --compat: also a login user per schema, CODE=NAME[,...] (a bare "
                        "CODE: <schema>_login), a member of its read-only role; its password "
                        "from the environment variable INGESTOR_COMPAT_PASSWORD_<NAME> (NAME in "
                        "capitals); a second run sets it again (see docs/compat.md)")
    p.add_argument("--config", metavar="FILE",
                   help="the daemon's settings file: --compat refuses views built on a "
                        "timeframe its pipeline.timeframes lacks (default: the defaults)")
    p.add_argument("--check", action="store_true",
                   help="only report whether the schema is current (exit 1 if not)")
    p.set_defaults(func=run)


def _per_table(values: list[str], flag: str, allow_off: bool) -> dict:
    from ingestor.cli import UsageError
    from ingestor.store.timescale import TimescaleError, interval_literal

    out: dict = {}
    for item in values:
        table, sep, value = item.partition("=")
        if not sep:
            table, value = "", item
        table, value = table.strip(), value.strip()
        if table and table not in TABLES:
            raise UsageError(f"{flag}: unknown table {table!r} (one of {', '.join(TABLES)})")
        if value.lower() in _OFF:
            if not allow_off:
                raise UsageError(f"{flag}: cannot be off")
            parsed = None
        else:
            try:
                interval_literal(value)
            except TimescaleError as exc:
                raise UsageError(f"{flag}: {exc}") from None
            parsed = value
        for t in ([table] if table else TABLES):
            out[t] = parsed
    return out


def run(args: argparse.Namespace) -> int:
    from ingestor.cli import Failure, UsageError
    from ingestor.store import migrate as mig
    from ingestor.store import roles, timescale
    from ingestor.store.dsn import connect, error_line, resolve_dsn

    import psycopg

    if (args.reader_role or args.writer_role) and not args.roles:
        raise UsageError("--reader-role/--writer-role need --roles")
    try:
        settings = timescale.TimescaleSettings(
            continuous_aggregate=args.continuous_aggregate).with_overrides(
            chunk_interval=_per_table(args.chunk_interval, "--chunk-interval", False),
            compress_after=_per_table(args.compress_after, "--compress-after", True),
            retention=_per_table(args.retention, "--retention", True))
        reader = roles.check_name(args.reader_role or roles.DEFAULT_READER)
        writer = roles.check_name(args.writer_role or roles.DEFAULT_WRITER)
    except (timescale.TimescaleError, roles.RoleError) as exc:
        raise UsageError(str(exc)) from None
    compat_plan = _compat_plan(args)

    dsn = resolve_dsn(args.dsn)
    with connect(dsn, autocommit=True) as conn:
        try:
            if args.check:
                status = mig.current(conn)
                print(status.message)
                return 0 if status else 1
            applied = mig.migrate(conn)
            if applied:
                print("applied " + ", ".join(m.label for m in applied))
            else:
                print(f"schema is current ({len(mig.discover())} migrations)")
            result = timescale.setup(conn, args.timescale, settings)
            if result.enabled:
                print(f"TimescaleDB {result.version}: {', '.join(TABLES)} are hypertables "
                      f"({len(result.statements)} statement(s) run)")
            else:
                print(f"TimescaleDB not used: {result.reason}; plain PostgreSQL tables")
            if args.roles:
                roles.ensure_roles(conn, reader, writer)
                print(f"roles {reader} (read-only) and {writer} (writer) ready")
            _compat_run(conn, compat_plan)
        except (mig.MigrationError, timescale.TimescaleError) as exc:
            raise Failure(str(exc)) from None
        except psycopg.Error as exc:
            raise Failure(f"migrate failed: {error_line(exc)}") from None
    return 0


def _compat_plan(args: argparse.Namespace):
    """The --compat/--drop-compat request, checked before anything connects."""
    from ingestor.cli import UsageError
    from ingestor.store import compat

    if not args.compat and (args.compat_timeframe or args.compat_exchanges
                            or args.compat_account_filter or args.login_users):
        raise UsageError("--compat-timeframe/--compat-exchanges/--compat-account-filter/"
                         "--login-users need --compat"
                         + (" (--drop-compat drops the login users --login-users created)"
                            if args.drop_compat and args.login_users else ""))
    if not (args.compat or args.drop_compat):
        return None
    if args.compat and args.drop_compat:
        raise UsageError("--compat and --drop-compat: one at a time")
    if args.drop_compat:
        return ("drop", compat.parse_codes(args.drop_compat, "--drop-compat"), None, [])
    configured = ()
    if args.config:
        from ingestor.config import load

        configured = tuple(load(args.config).pipeline.timeframes)
    codes = compat.parse_codes(args.compat)
    settings = compat.parse_settings(args.compat_timeframe, args.compat_exchanges, configured,
                                     args.compat_account_filter)
    named = set(settings.granularity) | set(settings.exchanges) | settings.account_filter
    if named - set(codes):
        raise UsageError("--compat-timeframe/--compat-exchanges/--compat-account-filter name "
                         f"{', '.join(sorted(named - set(codes)))}, which --compat does not")
    compat.check(codes, settings)
    users = compat.parse_login_users(args.login_users, codes) if args.login_users else []
    return ("create", codes, settings, users)


def _compat_run(conn, plan) -> None:
    from ingestor.store import compat

    if plan is None:
        return
    action, codes, settings, users = plan
    if action == "drop":
        notes = compat.drop(conn, codes)
        print("compatibility schemas dropped: "
              + ", ".join(compat.SEEDS[c].schema for c in codes))
        for note in notes:
            print(note)
        return
    for note in compat.create(conn, codes, settings, users):
        print(note)
    for c in codes:
        seed = compat.SEEDS[c]
        print(f"compat {c}: schema {seed.schema}, read-only role {seed.role}")
