"""``ingestor instruments load FILE``: load a Kite instruments dump (CSV) or an Angel One
instrument master (``OpenAPIScripMaster.json``, told apart by its first character, ``[``).

Kite: every line is validated first (a malformed one is reported with its line number and
nothing is loaded, exit 2); then the rows are COPYed to a staging table and upserted by
``instrument_token`` in one transaction.  Angel One: a file that is not a JSON array is
refused (exit 2); rows that do not validate are set aside, counted by reason and reported,
the rest upserted by (exchange type, token).  See :mod:`ingestor.store.instruments` for what
happens when a row's (exchange, symbol) is held by another token.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("instruments", help="manage the instruments registry")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    load = sub.add_parser("load", help="load a Kite instruments dump (CSV) or an Angel One "
                                       "instrument master (JSON), upsert by token")
    load.add_argument("file", metavar="FILE",
                      help="the broker's instruments dump: Kite's instruments CSV, or Angel "
                           "One's OpenAPIScripMaster.json (told apart by a leading '[')")
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

    angel = None
    try:
        if _is_json_array(args.file):
            angel = instruments.read_angel(args.file)
            rows = angel.rows
        else:
            rows = instruments.read_csv(args.file)
    except instruments.InstrumentsFileError as exc:
        raise UsageError(str(exc)) from None
    if angel is not None and angel.rejected:
        import sys

        for line in angel.examples:
            print(line, file=sys.stderr)
        print(f"{sum(angel.rejected.values())} row(s) set aside: "
              + ", ".join(f"{n} {why}" for why, n in sorted(angel.rejected.items())),
              file=sys.stderr)
    load = instruments.load_rows if angel is None else instruments.load_angel
    dsn = resolve_dsn(args.dsn)
    with connect(dsn) as conn:
        try:
            migrate.require_current(conn)
            res = load(conn, rows, deactivate_missing=args.deactivate_missing)
        except psycopg.Error as exc:
            raise Failure(f"instruments load failed: {error_line(exc)}") from None
    print(("Angel One: " if angel is not None else "")
          + f"{res.rows} instruments: {res.inserted} new, {res.updated} updated, "
          f"{res.unchanged} unchanged, {res.renamed} renamed (symbol taken by another token)"
          + (f", {res.deactivated} deactivated" if args.deactivate_missing else ""))
    return 0


def _is_json_array(path) -> bool:
    """An Angel One master starts with ``[`` (after whitespace or a BOM); a Kite dump with its
    CSV header."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False  # read_csv reports it
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
