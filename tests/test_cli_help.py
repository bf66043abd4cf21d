"""The command line's own surface: --version, the top-level help, every option's help and
default, global options after the command, one-line usage errors."""

from __future__ import annotations

import argparse
import subprocess

from daemon_harness import ingestor
from ingestor import DEBUG, __version__
from ingestor.cli import COMMANDS, build_parser, main

#: Options still without help text, in command modules other work owns; the test fails when
#: one is fixed (remove it here) or a new one appears.


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in dict.fromkeys(a.choices.values()):
                yield from _walk(sub)


def test_version_names_the_build(capsys):
    r = subprocess.run(ingestor("--version"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert r.stdout.startswith(f"ingestor {__version__} (")
    assert ("debug build" in r.stdout) == bool(DEBUG)


def test_top_level_help_says_what_it_does_and_lists_every_command():
    text = build_parser().format_help()
    assert "Market-data ingestion" in text and "``" not in text
    assert "Exit status: 0 success" in text
    for name in COMMANDS:
        shown = "dead-letter" if name == "deadletter" else name
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(shown + " ")), None)
        assert line and len(line.split()) > 1, f"{shown} has no help line"


def test_every_option_has_help_and_its_default():
    missing = set()
    for p in _walk(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = a.option_strings[0] if a.option_strings else a.dest
            if not a.help:
                missing.add((p.prog, name))
                continue
            shown = p._get_formatter()._expand_help(a)
            if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown.lower(), (p.prog, name, shown)
    assert not missing, missing


def test_global_options_are_accepted_after_the_command():
    p = build_parser()
    a = p.parse_args(["status", "--debug", "--log-format", "json"])
    assert a.debug and a.log_format == "json"
    a = p.parse_args(["--log-format", "json", "status"])       # before it, as always
    assert a.log_format == "json" and not a.debug
    a = p.parse_args(["dead-letter", "list", "x", "--debug"])    # and after a nested action
    assert a.debug


def test_usage_error_is_one_line_without_a_doubled_prefix(capsys):
    assert main(["status", "--stale", "soon"]) == 2
    err = capsys.readouterr().err
    assert err == ("ingestor: error: argument --stale: invalid float value: 'soon' "
                   "(see 'ingestor status --help')\n")
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ingestor: error: argument COMMAND: invalid choice") and err.count("\n") == 1
