"""Settings: every bad one refused at load with exit 2 and one line naming the key and the file;
the [[feeds]] list (and the old [feed]); credentials files; configured tokens are not
instruments until the broker sends them; malformed DSNs never echoed."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from pathlib import Path

import psycopg
import pytest

from ingestor import _core
from ingestor import config as config_mod
from ingestor.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch):
    for k in ("KITE_API_KEY", "KITE_ACCESS_TOKEN", "INGESTOR_DSN", "DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main()`` points the root logger at this test's captured stderr: put it back, or
    later tests log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run(capsys, *argv) -> tuple[int, list[str]]:
    rc = main(["run", *argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def _refused(tmp_path, capsys, text: str, key, *extra: str) -> str:
    """``text`` as a config: exit 2 and one line naming ``key`` (or one of a tuple) and the
    file."""
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    rc, lines = _run(capsys, "--config", str(path), *extra)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("ingestor: error:"), lines
    assert str(path) in lines[0], lines
    assert any(k in lines[0] for k in ((key,) if isinstance(key, str) else key)), lines
    return lines[0]


# -- every refused setting, one class per group ---------------------------------------------

TIMEFRAMES = [
    ('timeframes = ["2m"]', "pipeline.timeframes"),           # not in the schema's set
    ('timeframes = ["1m", "5m", "1m"]', "pipeline.timeframes"),  # twice
    ('timeframes = ["60s", "1m"]', "pipeline.timeframes"),     # an alias of 1m
    ('timeframes = []', "pipeline.timeframes"),
    ('timeframes = ["\u0661s"]', "pipeline.timeframes"),       # Arabic-Indic digit one
    ('timeframes = ["1M"]', "pipeline.timeframes"),
    ('open_candles_from = "2m"', "pipeline.open_candles_from"),
    ('open_candles_from = "60s"', "pipeline.open_candles_from"),
]


@pytest.mark.parametrize("line,key", TIMEFRAMES)
def test_bad_timeframes_refused(tmp_path, capsys, line, key):
    _refused(tmp_path, capsys, f"[pipeline]\n{line}\n", key)


def test_alias_names_the_stored_label(tmp_path, capsys):
    line = _refused(tmp_path, capsys, '[pipeline]\ntimeframes = ["60s"]\n', "pipeline.timeframes")
    assert "'1m'" in line


CLOCKS = [
    ('utc_offset = "IST"', "pipeline.utc_offset"),
    ('utc_offset = "+24:00"', "pipeline.utc_offset"),
    ('utc_offset = "+05:60"', "pipeline.utc_offset"),
    ('utc_offset = "+\u0660\u0665:\u0663\u0660"', "pipeline.utc_offset"),  # non-ASCII digits
    ('utc_offset = ""', "pipeline.utc_offset"),
    ('origin = "24:00"', "pipeline.origin"),
    ('origin = "-01:00"', "pipeline.origin"),
    ('origin = "9am"', "pipeline.origin"),
]


@pytest.mark.parametrize("line,key", CLOCKS)
def test_bad_offset_and_origin_refused(tmp_path, capsys, line, key):
    _refused(tmp_path, capsys, f"[pipeline]\n{line}\n", key)


def _numbers():
    out = []
    for key in ("flush_interval", "open_candle_interval", "mark_interval"):
        out += [("pipeline", key, v) for v in ("0", "-1", "nan", "inf", "-inf", "1e9")]
    out += [("pipeline", "snapshot_interval", v) for v in ("-0.5", "nan", "inf", "1e9")]
    out += [("pipeline", "flush_rows", v) for v in ("0", "-5", "1000000000")]
    for key, bad in (("heartbeat_timeout", ("0", "0.5", "nan", "inf")),
                     ("reconnect_min", ("0", "-1", "nan", "inf")),
                     ("reconnect_max", ("0", "nan", "inf")),
                     ("rejected_retry", ("0", "-1", "nan", "inf")),
                     ("connect_timeout", ("0", "nan", "inf")),
                     ("tokens_per_connection", ("0", "3001")),
                     ("max_connections", ("0", "4"))):
        out += [("feeds", key, v) for v in bad]
    out += [("", "shutdown_timeout", v) for v in ("0", "-1", "nan", "inf")]
    out += [("spool", "max_bytes", v) for v in ("0", "1048576", "-1")]
    out += [("spool", "segment_bytes", v) for v in ("0", "1000", "8589934592")]
    out += [("spool", "alarm_at", v) for v in ("0", "1.5", "nan", "-0.1")]
    out += [("spool", "fsync_interval", v) for v in ("0", "nan", "inf")]
    out += [("writer", "max_rejects", v) for v in ("0", "-1")]
    out += [("writer", "queue_batches", v) for v in ("0", "100000")]
    return out


@pytest.mark.parametrize("table,key,value", _numbers())
def test_bad_numbers_refused(tmp_path, capsys, table, key, value):
    if table == "feeds":
        text, name = f"[[feeds]]\n{key} = {value}\n", f"feeds[0].{key}"
    elif table:
        text, name = f"[{table}]\n{key} = {value}\n", f"{table}.{key}"
    else:
        text, name = f"{key} = {value}\n", key
    _refused(tmp_path, capsys, text, name)


def test_snapshot_interval_zero_and_bounds_accepted(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text("[pipeline]\nsnapshot_interval = 0\nflush_interval = 60\n"
                 "[spool]\nmax_bytes = 16777216\nsegment_bytes = 1048576\n"
                 "[[feeds]]\nheartbeat_timeout = 1\nreconnect_min = 2\nreconnect_max = 2\n")
    cfg = config_mod.load(str(p))
    assert cfg.pipeline.snapshot_interval == 0 and cfg.feeds[0].reconnect_max == 2


def test_reconnect_max_below_min_and_spool_below_segment_refused(tmp_path, capsys):
    _refused(tmp_path, capsys, "[[feeds]]\nreconnect_min = 5.0\nreconnect_max = 1.0\n",
             "feeds[0].reconnect_max")
    _refused(tmp_path, capsys, "[spool]\nmax_bytes = 33554432\nsegment_bytes = 67108864\n",
             "spool.max_bytes")


@pytest.mark.parametrize("listen", ["bogus", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:",
                                    ":abc", "127.0.0.1:\u0669\u0661\u0660\u0668",
                                    "no such host.invalid:9108", "[::1]:9108"])
def test_bad_metrics_listen_refused(tmp_path, capsys, listen):
    _refused(tmp_path, capsys, f'[metrics]\nlisten = "{listen}"\n', "metrics.listen")
    rc, lines = _run(capsys, "--metrics", listen)  # the flag is checked the same way
    assert rc == 2 and len(lines) == 1 and "metrics.listen" in lines[0], lines


@pytest.mark.parametrize("table,key", [("spool", "dir"), ("record", "dir"),
                                       ("writer", "dead_letter_dir")])
def test_directory_that_is_a_file_refused(tmp_path, capsys, table, key):
    (tmp_path / "afile").write_text("x")
    _refused(tmp_path, capsys, f'[{table}]\n{key} = "{{tmp}}/afile"\n', f"{table}.{key}")


def test_record_dir_same_as_spool_dir_refused(tmp_path, capsys):
    _refused(tmp_path, capsys, '[spool]\ndir = "{tmp}/s"\n[record]\ndir = "{tmp}/s/"\n',
             "record.dir")


TOKENS = [
    ("tokens = [0]", "feeds[0].tokens"),
    ("tokens = [4294967296]", "feeds[0].tokens"),
    ("tokens = [-1]", "feeds[0].tokens"),
    ("tokens = [99999999999999999999]", "feeds[0].tokens"),
    ("tokens = [5, 7, 5]", "feeds[0].tokens"),
    ('modes = { "0" = "ltp" }', "feeds[0].modes"),
    ('modes = { "4294967296" = "ltp" }', "feeds[0].modes"),
    ('modes = { "abc" = "ltp" }', "feeds[0].modes"),
    ('modes = { "0256265" = "ltp" }', "feeds[0].modes"),     # would never match str(token)
    ('modes = { "\u0661" = "ltp" }', "feeds[0].modes"),
    ("tokens_per_connection = 2\nmax_connections = 1\ntokens = [1, 2, 3]", "feeds[0].tokens"),
]


@pytest.mark.parametrize("line,key", TOKENS)
def test_bad_tokens_refused(tmp_path, capsys, line, key):
    _refused(tmp_path, capsys, f"[[feeds]]\n{line}\n", key)


def test_old_feed_table_named_feed_in_errors(tmp_path, capsys):
    _refused(tmp_path, capsys, "[feed]\ntokens = [0]\n", "feed.tokens")


def test_max_token_accepted(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text('[[feeds]]\ntokens = [1, 4294967295]\nmodes = { "4294967295" = "ltp" }\n')
    assert config_mod.load(str(p)).feeds[0].tokens == [1, 4294967295]


FEEDS = [
    ('[[feeds]]\nname = "Bad Name"\n', "feeds[0].name"),
    (f'[[feeds]]\nname = "{"a" * 33}"\n', "feeds[0].name"),
    ('[[feeds]]\nname = ""\n', "feeds[0].name"),
    ('[[feeds]]\nname = "k\u00e9"\n', "feeds[0].name"),
    ('[[feeds]]\nname = "a"\ntokens = [1]\napi_key_env = "A1"\naccess_token_env = "A2"\n'
     '[[feeds]]\nname = "a"\ntokens = [2]\napi_key_env = "B1"\naccess_token_env = "B2"\n',
     "feeds[1].name"),
    ('[[feeds]]\nname = "a"\ntokens = [1, 2]\napi_key_env = "A1"\naccess_token_env = "A2"\n'
     '[[feeds]]\nname = "b"\ntokens = [3, 2]\napi_key_env = "B1"\naccess_token_env = "B2"\n',
     "feeds[1].tokens"),                                               # token 2 twice
    ('[[feeds]]\nname = "a"\ntokens = []\napi_key_env = "A1"\naccess_token_env = "A2"\n'
     '[[feeds]]\nname = "b"\ntokens = [3]\napi_key_env = "B1"\naccess_token_env = "B2"\n',
     "feeds[0].tokens"),                                               # "all" overlaps
    ('[[feeds]]\nname = "a"\ntokens = [1]\n[[feeds]]\nname = "b"\ntokens = [2]\n'
     'api_key_env = "B1"\naccess_token_env = "B2"\n', "feeds[0]"),     # no credentials named
    ('[[feeds]]\nname = "a"\ntokens = [1]\ncredentials_file = "{tmp}/k"\n'
     '[[feeds]]\nname = "b"\ntokens = [2]\ncredentials_file = "{tmp}/./k"\n',
     "feeds[1].credentials_file"),                                     # shared credentials
    ('[[feeds]]\napi_key_env = "A1"\n', "api_key_env and access_token_env"),
    ('[[feeds]]\napi_key_env = "A-1"\naccess_token_env = "A2"\n', "feeds[0].api_key_env"),
    ('[[feeds]]\nbroker = "smartapi"\n', "feeds[0].broker"),          # not supported yet
    ('[[feeds]]\nurl = "http://example.com"\n', "feeds[0].url"),
    ('[[feeds]]\nurl = "ws://"\n', "feeds[0].url"),
    ('[[feeds]]\nurl = "ws://h:99999/"\n', "feeds[0].url"),
    ('[[feeds]]\nurl = "wss://h/?api_key=k&access_token=SECRETTOKEN"\n', "feeds[0].url"),
    ('[[feeds]]\nurl = "https://h/?token=SECRETTOKEN"\n', "feeds[0].url"),
    ('feeds = []\n', "feeds"),
    ('[feed]\ntokens = [1]\n[[feeds]]\ntokens = [2]\n', "[feed] and [[feeds]]"),
]


@pytest.mark.parametrize("text,key", FEEDS)
def test_bad_feeds_refused(tmp_path, capsys, text, key):
    line = _refused(tmp_path, capsys, text, key)
    assert "SECRETTOKEN" not in line


def test_huge_config_refused_with_bound(capsys):
    rc, lines = _run(capsys, "--config", "/dev/zero")
    assert rc == 2 and len(lines) == 1 and "/dev/zero" in lines[0] and "MiB" in lines[0], lines


@pytest.mark.parametrize("text,key", [
    # (decoded or not depending on the stack left: either way one line)
    ("[pipeline]\ntimeframes = " + "[" * 200_000 + "]" * 200_000 + "\n",
     ("pipeline.timeframes", "nested too deeply")),
    ("x = " + "{a=" * 100_000 + "1" + "}" * 100_000 + "\n",
     ("x: unknown key", "nested too deeply")),
    ("[pipeline\nflush_rows = 1\n", "TOML"),
    ("\x00\x01\x02 = \xff", "TOML"),
    ("[pipeline]\nflush_rows = 1\nflush_rows = 2\n", "TOML"),
    ("[pipeline]\nflush_rows = 1.5\n", "pipeline.flush_rows"),
    ("[pipeline]\nflush_row = 1\n", "flush_row"),
])
def test_hostile_or_malformed_file_is_one_line(tmp_path, capsys, text, key):
    _refused(tmp_path, capsys, text, key)


# -- the timeframe set is the schema's ------------------------------------------------------

def test_timeframes_constant_is_the_schema_check():
    sql = (ROOT / "src/ingestor/store/sql/0001_market_data.sql").read_text()
    m = re.search(r"ohlc_candles_timeframe_check\s+CHECK \(timeframe IN \(([^)]*)\)\)", sql)
    assert m, "the timeframe check constraint moved"
    assert tuple(re.findall(r"'([^']*)'", m.group(1))) == config_mod.TIMEFRAMES
    assert tuple(config_mod.PipelineConfig().timeframes) == config_mod.TIMEFRAMES
    assert set(_core.DEFAULT_TIMEFRAMES) <= set(config_mod.TIMEFRAMES)


# -- feeds ----------------------------------------------------------------------------------

TWO_FEEDS = """
[[feeds]]
name = "kite-main"
tokens = [256265, 408065]
modes = { "408065" = "quote" }
credentials_file = "{tmp}/main.env"

[[feeds]]
name = "kite-2"
broker = "kite"
url = "wss://ws2.example.com"
tokens = [738561]
api_key_env = "KITE2_API_KEY"
access_token_env = "KITE2_ACCESS_TOKEN"
heartbeat_timeout = 5.0
"""


def test_two_feeds_load_with_their_own_credentials(tmp_path):
    (tmp_path / "main.env").write_text("# main account\n\napi_key = mainkey1\n"
                                       "access_token='maintoken1'\n")
    p = tmp_path / "feeds.toml"
    p.write_text(TWO_FEEDS.replace("{tmp}", str(tmp_path)))
    cfg = config_mod.load(str(p))
    assert [f.name for f in cfg.feeds] == ["kite-main", "kite-2"]
    assert cfg.feeds[1].url == "wss://ws2.example.com" and cfg.feeds[1].heartbeat_timeout == 5.0
    assert cfg.feeds[0].heartbeat_timeout == 10.0
    env = {"KITE_API_KEY": "ignored1", "KITE_ACCESS_TOKEN": "ignored2",
           "KITE2_API_KEY": "key2222", "KITE2_ACCESS_TOKEN": "tok2222"}
    # with several feeds nothing is implicit: KITE_API_KEY is no feed's
    assert config_mod.credentials(cfg, cfg.feeds[0], env) == ("mainkey1", "maintoken1")
    assert config_mod.credentials(cfg, cfg.feeds[1], env) == ("key2222", "tok2222")
    with pytest.raises(config_mod.ConfigError, match=r"feeds\[1\].*KITE2_API_KEY"):
        config_mod.credentials(cfg, cfg.feeds[1],
                               {"KITE_API_KEY": "a1234", "KITE_ACCESS_TOKEN": "b1234"})


def test_same_token_on_two_feeds_names_both(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('[[feeds]]\nname = "a"\ntokens = [9]\napi_key_env = "A1"\n'
                 'access_token_env = "A2"\n[[feeds]]\nname = "b"\ntokens = [9]\n'
                 'api_key_env = "B1"\naccess_token_env = "B2"\n')
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(str(p))
    assert "feeds[1].tokens" in str(e.value) and "feeds[0]" in str(e.value) and "9" in str(e.value)


def test_old_feed_table_loads_as_one_feed_named_kite(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text('[feed]\nurl = "ws://127.0.0.1:9"\ntokens = [5, 6]\nmode = "ltp"\n'
                 'heartbeat_timeout = 2.0\n')
    cfg = config_mod.load(str(p))
    assert len(cfg.feeds) == 1
    f = cfg.feeds[0]
    assert (f.name, f.broker, f.url, f.tokens, f.mode, f.heartbeat_timeout) == \
        ("kite", "kite", "ws://127.0.0.1:9", [5, 6], "ltp", 2.0)
    config_mod.validate(cfg)  # again, as `ingestor run` does after its flags: still one feed
    assert cfg.feeds == [f]
    env = {"KITE_API_KEY": "k" * 8, "KITE_ACCESS_TOKEN": "t" * 8}
    assert config_mod.credentials(cfg, environ=env) == ("k" * 8, "t" * 8)


def test_no_config_is_one_default_feed():
    assert len(config_mod.Config().feeds) == 1  # a list as soon as constructed
    cfg = config_mod.load(None)
    assert [(f.name, f.broker, f.url) for f in cfg.feeds] == \
        [("kite", "kite", "wss://ws.kite.trade")]


@pytest.mark.parametrize("flag", [["--url", "ws://127.0.0.1:9"], ["--tokens", "1,2"],
                                  ["--mode", "ltp"]])
def test_feed_flags_with_several_feeds_are_a_usage_error(tmp_path, capsys, flag):
    (tmp_path / "main.env").write_text("api_key=mainkey1\naccess_token=maintoken1\n")
    p = tmp_path / "feeds.toml"
    p.write_text(TWO_FEEDS.replace("{tmp}", str(tmp_path)))
    rc, lines = _run(capsys, "--config", str(p), *flag)
    assert rc == 2 and len(lines) == 1 and flag[0] in lines[0], lines


def test_several_feeds_each_need_their_credentials(tmp_path, capsys):
    """`ingestor run` checks such a config fully (each feed's credentials read) before
    connecting anywhere."""
    (tmp_path / "main.env").write_text("api_key=mainkey1\naccess_token=maintoken1\n")
    p = tmp_path / "feeds.toml"
    p.write_text(TWO_FEEDS.replace("{tmp}", str(tmp_path)))
    rc, lines = _run(capsys, "--config", str(p))
    assert rc == 2 and len(lines) == 1 and "feeds[1]" in lines[0] and "KITE2_API_KEY" in lines[0]


def test_feed_flags_apply_to_the_single_feed(tmp_path, capsys):
    p = tmp_path / "one.toml"
    p.write_text('[[feeds]]\ntokens = [1]\n')
    # --tokens are checked like the file's: 0 is no token
    rc, lines = _run(capsys, "--config", str(p), "--tokens", "3,0")
    assert rc == 2 and len(lines) == 1 and "feeds[0].tokens" in lines[0], lines


# -- credentials files ----------------------------------------------------------------------

@pytest.mark.parametrize("content,named", [
    ("api_key=abcd1234\nsecret=VALUE98765\naccess_token=tok12345\n", "'secret'"),
    ("api_key=abcd1234\nAPI_KEY=VALUE98765\n", "'API_KEY'"),
    ("api_key=abcd1234\nVALUE98765\n", "line 2"),
    ("api_key=abcd1234\napi_key=VALUE98765\n", "line 2"),
])
def test_credentials_file_with_unknown_key_refused(tmp_path, capsys, content, named):
    cred = tmp_path / "kite.env"
    cred.write_text(content)
    p = tmp_path / "c.toml"
    p.write_text(f'[[feeds]]\ncredentials_file = "{cred}"\n')
    rc, lines = _run(capsys, "--config", str(p))
    assert rc == 2 and len(lines) == 1, lines
    assert str(cred) in lines[0] and named in lines[0] and "credentials_file" in lines[0], lines
    assert "VALUE98765" not in lines[0] and "abcd1234" not in lines[0]


def test_credentials_file_comments_and_blank_lines_allowed(tmp_path):
    cred = tmp_path / "kite.env"
    cred.write_text("# Kite Connect\n\n  api_key = \"abcd1234\"  \n# rotated daily\n"
                    "access_token=tok12345\n")
    p = tmp_path / "c.toml"
    p.write_text(f'[[feeds]]\ncredentials_file = "{cred}"\n')
    cfg = config_mod.load(str(p))
    assert config_mod.credentials(cfg, environ={}) == ("abcd1234", "tok12345")


def test_missing_credentials_exit_2(tmp_path, capsys):
    p = tmp_path / "c.toml"
    p.write_text("[[feeds]]\ntokens = [1]\n")
    rc, lines = _run(capsys, "--config", str(p))
    assert rc == 2 and len(lines) == 1 and "KITE_API_KEY" in lines[0], lines


# -- README --------------------------------------------------------------------------------

def test_readme_settings_block_loads(tmp_path):
    """The documented settings are a config that loads (after its paths are made local)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Settings (TOML"):]
    block = block[block.index("```toml\n") + 8:]
    block = block[:block.index("```")]
    assert "[[feeds]]" in block
    cfg = config_mod.load(_write(tmp_path, block))
    assert len(cfg.feeds) >= 1 and cfg.pipeline.timeframes == list(config_mod.TIMEFRAMES)


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "readme.toml"
    p.write_text(text)
    return str(p)


# -- configured tokens are not instruments until the broker sends them ----------------------

def _placeholders(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("select instrument_token from instruments "
                                        "where symbol like 'TOKEN:%' order by 1")]


def test_configured_tokens_not_registered_at_start(tmp_path, db):
    """A daemon started with configured tokens and its feed down gets past the token plan
    (it retries the feed) without making those tokens instruments."""
    from daemon_harness import Daemon, wait_for

    d = Daemon(tmp_path, db, "ws://127.0.0.1:1", feed="tokens = [11, 22, 33]\n")
    try:
        wait_for(lambda: "cannot connect" in d.output(), timeout=30)
        assert d.proc.poll() is None, d.output()
    finally:
        assert d.terminate() == 0, d.output()
    assert _placeholders(db) == []


def test_daemon_registers_a_configured_token_when_its_first_packet_arrives(tmp_path, db):
    from daemon_harness import Daemon, Simulator, count_ticks, wait_for

    sim = Simulator(tmp_path, tokens=10, rate=2000)
    try:
        with open(sim.csv) as f:
            sent = sorted(int(r["instrument_token"]) for r in csv.DictReader(f))[:3]
        never = 4294967295  # the simulator knows no such instrument: no packet comes
        d = Daemon(tmp_path, db, sim.url, feed=f"tokens = {sent + [never]}\n")
        try:
            wait_for(lambda: len(_placeholders(db)) == 3 and count_ticks(db) > 0, timeout=60)
            assert d.terminate() == 0, d.output()
        finally:
            if d.proc.poll() is None:
                d.kill()
    finally:
        sim.stop()
    assert _placeholders(db) == sent


# -- a malformed DSN is never echoed --------------------------------------------------------

@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 password=ab cd PW789 dbname=x",      # unquoted password with spaces
    "host=127.0.0.1 password=ab PW789=x",
    "postgresql://u:ab PW789@127.0.0.1/x",
    "postgresql://u:abPW789@[::1/x",
])
def test_malformed_dsn_fragment_withheld(capsys, dsn):
    rc = main(["migrate", "--dsn", dsn])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert "malformed DSN" in lines[0] and "fragment withheld" in lines[0], err
    assert "PW789" not in err and "ab " not in err and "cd" not in err


def test_long_values_are_not_echoed_whole(tmp_path, capsys):
    line = _refused(tmp_path, capsys, f'[pipeline]\ntimeframes = ["{"x" * 5000}"]\n',
                    "pipeline.timeframes")
    assert len(line) < 400


# -- [sessions]: market hours per segment --------------------------------------------------

SESSIONS = [
    ('forex = "09:00-17:00"', "sessions.forex: unknown session"),
    ('equity = "9-15"', "sessions.equity = '9-15': want"),
    ('equity = "15:30-09:15"', "sessions.equity = '15:30-09:15': opens at 15:30, not before"),
    ('equity = "09:15-25:00"', "sessions.equity = '09:15-25:00': times must be 00:00 to 23:59"),
    ('equity = "09:15-15:30@XXXX"', "sessions.equity = '09:15-15:30@XXXX': unknown holiday"),
    ('equity = "09:15-15:30,currency=09:00-19:00"', "sessions.equity"),  # one item per key
    ('equity = "equity=09:15-15:30"', "sessions.equity"),
    ('equity = 915', "sessions.equity = 915: want a string"),
    ('equity = {opens = "09:15"}', "sessions.equity = {'opens': '09:15'}: want a string"),
    ('equity = ""', "sessions.equity = '': want"),
    ('"\\u0000equity" = "09:15-15:30"', "sessions.\\x00equity: unknown session"),
]


@pytest.mark.parametrize("line,says", SESSIONS)
def test_bad_sessions_refused(tmp_path, capsys, line, says):
    _refused(tmp_path, capsys, f"[sessions]\n{line}\n", says)


def test_sessions_not_a_table_refused(tmp_path, capsys):
    _refused(tmp_path, capsys, 'sessions = "equity=09:15-15:30"\n', "sessions: expected a table")


def test_sessions_load_and_feed_the_market_open_metric(tmp_path, monkeypatch):
    from ingestor import market_hours
    from ingestor.config import load
    from ingestor.metrics import MarketCollector, Metrics

    cfg = load(_write(tmp_path, '[sessions]\ncommodity = "09:00-23:55@XNSE"\n'
                                'currency = "09:00-19:00@none"\n'))
    assert cfg.sessions == {"commodity": "09:00-23:55@XNSE", "currency": "09:00-19:00@none"}
    by = {s.name: s for s in MarketCollector(environ={}, sessions=cfg.sessions).sessions}
    assert by["commodity"].closes == dt.time(23, 55) and by["currency"].closes == dt.time(19)
    assert by["currency"].calendar == "none" and by["equity"] == market_hours.DEFAULT_SESSIONS[0]
    # INGESTOR_SESSIONS goes over the file
    env = {market_hours.ENV: "currency=10:00-17:00"}
    by = {s.name: s for s in MarketCollector(environ=env, sessions=cfg.sessions).sessions}
    assert by["currency"].opens == dt.time(10) and by["currency"].calendar == "none"
    # the daemon's metrics (Daemon: Metrics(sessions=cfg.sessions)) judge by them
    monkeypatch.delenv(market_hours.ENV, raising=False)
    m = Metrics(sessions=cfg.sessions)
    assert {s.name: s.closes for s in m.market.sessions}["commodity"] == dt.time(23, 55)
    assert 'ingestor_market_open{session="commodity"}' in m.render().decode()
