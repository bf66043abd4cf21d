"""The ``ingestor`` console script (also ``python -m ingestor``).

Each subcommand lives in ``ingestor/commands/<name>.py`` with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``.  This module only wires
them and applies the exit-status contract of DESIGN.md: 0 on success, 2 on
bad usage or bad input, 1 on other failures, one clear line on stderr and no
traceback unless ``--debug``.

Library code raises the package's own errors (``ingestor.errors``); this module maps them:
an :class:`~ingestor.errors.IngestorError` exits with its ``exit_status`` (2 for
:class:`~ingestor.errors.UsageError` and :class:`~ingestor.errors.ConfigError`, else 1),
``ingestor.config.ConfigError`` with 2, anything else with 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ingestor.errors import IngestorError, UsageError

#: Subcommands in help order; each names a module of ingestor.commands.
COMMANDS = ("demo", "migrate", "instruments", "run", "status", "simulate", "replay", "deadletter",
            "decode", "bench")

__all__ = ["Failure", "UsageError", "main"]

#: Any other failure the user should read about in one line: exit status 1.  The commands
#: raise it; it is the base of the package's errors, so ``except Failure`` catches them all.
Failure = IngestorError


#: What the tool does: the top-level help's first line.
DESCRIPTION = ("Market-data ingestion: the broker's WebSocket feed (Kite Connect) through a "
               "compiled decoder and aggregator into PostgreSQL/TimescaleDB, exactly once.")
EPILOG = ("Run 'ingestor COMMAND --help' for a command's options. Exit status: 0 success, "
          "2 bad usage or bad input, 1 other failures (one line on stderr; a traceback with "
          "--debug). The database is --dsn, else INGESTOR_DSN, else DATABASE_URL, else the "
          "config file's, else libpq's defaults.")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended as ``ArgumentDefaultsHelpFormatter``
    does, except where there is none to say (None, False, []) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text.lower()
                or action.default in (None, False, argparse.SUPPRESS) or action.default == []):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # argparse's own usage errors: one line, status 2
        hint = f" (see '{self.prog} --help')" if self.prog != "ingestor" else ""
        raise UsageError(f"{message}{hint}")


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    """--debug and --log-format: before the command, and after it (``default`` SUPPRESS
    there, so a subcommand that is not given them keeps the top level's values)."""
    parser.add_argument("--debug", action="store_true", default=default if default else False,
                        help="show tracebacks and debug logs")
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=default if default else "text",
                        help="log line format (json: one object per line)")


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases: once each
                yield sub
                yield from _subparsers(sub)


def _version() -> str:
    from ingestor import DEBUG, __version__

    build = "debug build of the core: checks on, several times slower" if DEBUG else "release build"
    return f"ingestor {__version__} ({build})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ingestor", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=_version(),
                        help="print the version and the build of the core, and exit")
    _global_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                                title="commands")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ingestor.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ingestor.commands.{name}":
                raise
            continue  # not built yet
        module.add_parser(sub)
    for p in _subparsers(parser):
        _global_options(p, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        from ingestor.logs import setup_logging

        setup_logging(debug=args.debug, fmt=args.log_format)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except UsageError as exc:
        _fail(exc, debug)
        return 2
    except KeyboardInterrupt:
        print("ingestor: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # ``ingestor decode --jsonl | head``: the reader left; not an error.
        sys.stderr.close()
        return 0
    except IngestorError as exc:
        _fail(exc, debug)
        return exc.exit_status
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into lines
        from ingestor.config import ConfigError
        from ingestor.logs import redact

        if isinstance(exc, ConfigError):  # a bad setting (config.py predates ingestor.errors)
            _fail(exc, debug)
            return 2
        if debug:
            raise
        print(f"ingestor: error: {redact(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1


def _fail(exc: Exception, debug: bool) -> None:
    from ingestor.logs import redact

    if debug:
        logging.getLogger("ingestor").exception("failed")
    print(f"ingestor: error: {redact(str(exc))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
