"""``ingestor instruments load FILE.csv``: load a Kite instruments dump into ``instruments``.

Every line is validated first (a malformed one is reported with its line number and
nothing is loaded, exit 2); then the rows are COPYed to a staging table and upserted by
``instrument_token`` in one transaction.  See :mod:`ingestor.store.instruments` for what
happens when a row's (exchange, symbol) is held by another token.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("instruments", help="manage the instruments registry")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    load = sub.add_parser("load", help="load a Kite instruments dump (CSV), upsert by token")
    load.add_argument("file", metavar="FILE.csv",
                      help="the broker's instruments dump (Kite's instruments CSV)")
    load.add_argument("--dsn", help="database (default: INGESTOR_DSN, DATABASE_URL, "
                                    "libpq defaults)")
    load.add_argument("--deactivate-missing", action="store_true",
                      help="the file is a complete dump: mark instruments it lacks inactive")
    load.set_defaults(func=run_load)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser) -> int:
    from ingestor.cli import UsageError

    raise UsageError(f"{parser.prog}: an action is required (load)")


def run_load(args: argparse.Namespace) -> int:
    import psycopg

    from ingestor.cli import Failure, UsageError
    from ingestor.store import instruments, migrate
    from ingestor.store.dsn import connect, error_line, resolve_dsn

    try:
        rows = instruments.read_csv(args.file)
    except instruments.InstrumentsFileError as exc:
        raise UsageError(str(exc)) from None
    dsn = resolve_dsn(args.dsn)
    with connect(dsn) as conn:
        try:
            migrate.require_current(conn)
            res = instruments.load_rows(conn, rows, deactivate_missing=args.deactivate_missing)
        except psycopg.Error as exc:
            raise Failure(f"instruments load failed: {error_line(exc)}") from None
    print(f"{res.rows} instruments: {res.inserted} new, {res.updated} updated, "
          f"{res.unchanged} unchanged, {res.renamed} renamed (symbol taken by another token)"
          + (f", {res.deactivated} deactivated" if args.deactivate_missing else ""))
    return 0
