"""``ingestor status``: what it reports and when it asks for attention, on real databases.

The simulated capture's ticks are received on Monday 2024-08-12 from 09:15:00 IST for
about 40 s, on every exchange; judging ``--at`` chosen instants against them exercises the
trading calendar without depending on the day the test runs: 11:00 that Monday is inside
every session (stale ticks need attention), 08:00 is before any session, and Thursday
2024-08-15 is Independence Day (an NSE holiday: nothing is expected).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import psycopg
import pytest

from daemon_harness import Daemon, Simulator, count_ticks, free_port, load_instruments, wait_for
from ingestor import market_hours
from ingestor.cli import main
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture

IST = market_hours.IST


def _main(capsys, *args: str):
    capsys.readouterr()  # not what fixtures printed (a stale log handler of another test's main())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rc = main(["status", *args])
    finally:  # main() points the root logger at capsys' stream, which closes after the test
        root.handlers[:], root.level = handlers, level
    return rc, capsys.readouterr()


def status(capsys, *args: str) -> tuple[int, str]:
    rc, out = _main(capsys, *args)
    return rc, out.out + out.err


def status_json(capsys, *args: str) -> tuple[int, dict]:
    rc, out = _main(capsys, "--json", *args)
    return rc, json.loads(out.out)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("status") / "market.cap"
    generate_capture(path, ticks=20_000, tokens=30, mode="mixed", seed=1)  # that Monday
    return path


@pytest.fixture
def filled(db, capture, tmp_path):
    replay(str(capture), db, dead_letter_dir=str(tmp_path / "dead"), progress=False)
    return db


# -- the calendar --------------------------------------------------------------------------------

def test_sessions_follow_the_nse_calendar_and_hours():
    eq, cur, com = market_hours.DEFAULT_SESSIONS
    monday = dt.datetime(2024, 8, 12, 9, 14, tzinfo=IST)
    assert not eq.is_open(monday) and cur.is_open(monday) and com.is_open(monday)
    assert eq.open_since(monday.replace(minute=16)) == 60
    assert not eq.is_open(monday.replace(hour=15, minute=30))          # the close is exclusive
    assert com.is_open(monday.replace(hour=23, minute=0)) and not cur.is_open(monday.replace(hour=17))
    assert eq.holiday(dt.date(2024, 8, 15)) and not eq.is_open(dt.datetime(2024, 8, 15, 11, tzinfo=IST))
    assert eq.holiday(dt.date(2026, 1, 26))                           # Republic Day
    assert not eq.is_trading_day(dt.date(2024, 8, 17))                # a Saturday
    # an instant in another zone is judged in IST: 05:30 UTC is 11:00 IST
    assert eq.is_open(dt.datetime(2024, 8, 12, 5, 30, tzinfo=dt.timezone.utc))
    assert market_hours.session_of("MCX", market_hours.DEFAULT_SESSIONS) is com
    assert market_hours.session_of("XYZ", market_hours.DEFAULT_SESSIONS) is None


def test_session_overrides_parse_and_bad_ones_are_named():
    s = market_hours.parse(["commodity=09:00-23:55", "equity = 09:00-15:30 @ none"])
    by = {x.name: x for x in s}
    assert by["commodity"].closes == dt.time(23, 55) and by["commodity"].calendar == "XNSE"
    assert by["equity"].opens == dt.time(9, 0) and by["equity"].holiday(dt.date(2024, 8, 15)) is None
    for bad, says in (("equity=9-15", "want NAME=HH:MM-HH:MM"), ("forex=09:00-17:00", "unknown"),
                      ("equity=15:30-09:15", "not before it closes"),
                      ("equity=09:15-25:00", "00:00 to 23:59"),
                      ("equity=09:15-15:30@XXXX", "unknown holiday calendar")):
        with pytest.raises(market_hours.SessionError, match=says):
            market_hours.parse([bad])
    env = {market_hours.ENV: "currency=09:00-19:00"}
    assert {x.name: x for x in market_hours.from_env(env)}["currency"].closes == dt.time(19)


# -- the command ---------------------------------------------------------------------------------

def test_fresh_database_needs_no_attention_and_json_has_every_part(capsys, db):
    rc, rep = status_json(capsys, "--dsn", db, "--at", "2024-08-12T11:00")
    assert rc == 0, rep
    assert set(rep) == {"at", "sessions", "database", "dead_letter_batches", "spool", "daemon",
                        "attention"}
    assert rep["at"] == "2024-08-12T11:00:00+05:30" and rep["attention"] == []
    assert [s["name"] for s in rep["sessions"]] == ["equity", "currency", "commodity"]
    assert all(s["open"] and s["trading_day"] for s in rep["sessions"])
    d = rep["database"]
    assert d["reachable"] and d["schema_current"] and d["errors"] == {}
    assert d["newest_ticks"] == {} and d["streams"] == [] and d["feed_gaps"] == []
    assert d["postback_dead_letters"] == {"today": 0, "latest": []}
    assert [t["table"] for t in d["tables"]] == ["tick_data", "ohlc_candles", "order_book_snapshots"]
    assert all(t["rows_today"] == 0 and t["bytes"] > 0 for t in d["tables"])
    assert rep["spool"] is None and rep["daemon"] is None and rep["dead_letter_batches"] is None
    rc, text = status(capsys, "--dsn", db, "--at", "2024-08-12T11:00")
    assert rc == 0 and "no ticks stored yet" in text and "nothing needs attention" in text


def test_stale_ticks_in_market_hours_need_attention(capsys, filled):
    with psycopg.connect(filled) as c:
        newest = dict(c.execute("select exchange, max(time) from tick_data group by 1").fetchall())
        day_rows = c.execute("select count(*) from tick_data").fetchone()[0]
        candles = c.execute("select count(*) from ohlc_candles").fetchone()[0]
    assert {"NSE", "MCX", "CDS"} <= set(newest)
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T11:00")
    assert rc == 1
    got = {ex: dt.datetime.fromisoformat(t) for ex, t in rep["database"]["newest_ticks"].items()}
    assert got == newest                                  # engine_state agrees with tick_data
    stale = {a.split(":")[0] for a in rep["attention"]}
    assert stale == set(newest), rep["attention"]         # every session is open at 11:00
    rows = {t["table"]: t["rows_today"] for t in rep["database"]["tables"]}
    assert rows["tick_data"] == day_rows == 20_000 and rows["ohlc_candles"] == candles
    stream = rep["database"]["streams"][0]
    assert stream["stream"] and stream["committed_seq"] > 0
    # the text names the exchange and says how old its newest tick is
    rc, text = status(capsys, "--dsn", filled, "--at", "2024-08-12T11:00")
    assert rc == 1 and "needs attention:" in text
    assert "NSE: newest tick 1h44m old (2024-08-12 09:15" in text and "equity session is open" in text
    # evening: only the commodity session is open, so only its exchanges are stale
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T20:00")
    assert rc == 1 and {a.split(":")[0] for a in rep["attention"]} == {"MCX", "NCO"}
    # a later --stale allows for it
    rc, _ = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T11:00", "--stale", "7000")
    assert rc == 0


def test_outside_market_hours_nothing_is_expected(capsys, filled):
    for at in ("2024-08-12T08:00",            # before any session opens
               "2024-08-12T23:45",            # after the commodity close
               "2024-08-15T11:00",            # Independence Day, an NSE holiday (a Thursday)
               "2024-08-17T11:00",            # a Saturday
               "2024-08-12T09:15:50"):        # ticks 13 s old: fresh
        rc, rep = status_json(capsys, "--dsn", filled, "--at", at)
        assert rc == 0, (at, rep["attention"])
    # just after the equity opening its grace period holds (the ticks stopped at 09:15:37);
    # currency and commodities opened at 09:00, so their exchanges are stale
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T09:17", "--stale", "30")
    assert rc == 1
    assert {a.split(":")[0] for a in rep["attention"]} == {"CDS", "BCD", "MCXSX", "MCX", "NCO"}
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T09:17", "--stale", "30",
                          "--grace", "60")
    assert rc == 1 and any(a.startswith("NSE:") for a in rep["attention"])
    # the holiday is said in the text, and an override can open the session (a weekdays-only
    # calendar): then the ticks are stale
    rc, text = status(capsys, "--dsn", filled, "--at", "2024-08-15T11:00")
    assert "closed (Independence Day)" in text
    rc, _ = status_json(capsys, "--dsn", filled, "--at", "2024-08-15T11:00",
                        "--session", "equity=09:15-15:30@none")
    assert rc == 1


def test_gaps_and_dead_letters_are_named(capsys, filled, tmp_path):
    dead = tmp_path / "dead-letters"
    dead.mkdir()
    (dead / "kite-0-x-10-20.json").write_text(json.dumps(
        {"stream": "kite-0-x", "first_seq": 10, "last_seq": 20, "reason": "numeric field overflow",
         "set_aside_at": "2024-08-12T05:00:00Z"}))
    (dead / "kite-0-x-1-9.applied.json").write_text(json.dumps(
        {"stream": "kite-0-x", "first_seq": 1, "last_seq": 9, "reason": "fixed"}))
    with psycopg.connect(filled) as c:
        c.execute("insert into feed_gaps (connection, stream, started_at, ended_at, reason, tokens)"
                  " values ('kite-1', 's1', '2024-08-12 10:00+05:30', '2024-08-12 10:00:04+05:30',"
                  " 'connection closed', '{1,2,3}'), ('kite-2', 's2', '2024-08-12 10:30+05:30', null,"
                  " 'heartbeat timeout', '{4}'), ('kite-3', 's3', '2024-08-09 10:00+05:30',"
                  " '2024-08-09 10:01+05:30', 'yesterday', null)")
        c.execute("insert into postback_dead_letters (received_at, stream, seq, reason, payload) "
                  "values ('2024-08-12 10:15+05:30', 'kite-0-x', 7, 'not JSON', 'garbage')")
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T11:00",
                          "--dead-letter-dir", str(dead), "--stale", "1e9")
    assert rc == 1
    gaps = rep["database"]["feed_gaps"]
    assert [g["connection"] for g in gaps] == ["kite-1", "kite-2"]      # not the older day's
    assert gaps[0]["tokens"] == 3 and gaps[1]["ended_at"] is None
    dl = rep["dead_letter_batches"]
    assert dl["applied"] == 1 and [e["first_seq"] for e in dl["pending"]] == [10]
    assert rep["database"]["postback_dead_letters"]["today"] == 1
    att = "\n".join(rep["attention"])
    assert "feed kite-2: disconnected since 2024-08-12 10:30:00 (heartbeat timeout)" in att
    assert "dead letters: 1 batch(es) set aside" in att and "postbacks: 1 set aside today" in att
    assert len(rep["attention"]) == 3, att
    rc, text = status(capsys, "--dsn", filled, "--at", "2024-08-12T11:00",
                      "--dead-letter-dir", str(dead), "--stale", "1e9")
    assert "kite-2" in text and "still open" in text and "numeric field overflow" in text
    # an open gap outside market hours is shown, not alarmed; the dead letters still are
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T23:50",
                          "--dead-letter-dir", str(dead))
    assert rc == 1 and not any("kite-2" in a for a in rep["attention"])
    # a file in the folder that is not a description is reported, not a crash
    (dead / "junk.json").write_text("{not json")
    rc, rep = status_json(capsys, "--dsn", filled, "--at", "2024-08-12T08:00",
                          "--dead-letter-dir", str(dead))
    assert rc == 1 and any("not a dead-letter description" in a for a in rep["attention"])


def test_unreachable_database_and_daemon_need_attention(capsys, tmp_path):
    port = free_port()
    rc, rep = status_json(capsys, "--dsn", f"host=127.0.0.1 port={port} user=postgres password=s3cr3t",
                          "--metrics", f"127.0.0.1:{free_port()}", "--spool-dir",
                          str(tmp_path / "nope"), "--timeout", "2")
    assert rc == 1
    assert not rep["database"]["reachable"]
    assert rep["daemon"]["status"] is None and rep["spool"]["note"] == "no such folder"
    att = "\n".join(rep["attention"])
    assert "database: cannot connect" in att and "daemon:" in att and "does not answer" in att
    assert "s3cr3t" not in json.dumps(rep)


def test_bad_usage_exits_2(capsys, db):
    for args, says in ((["--at", "yesterday"], "--at"), (["--session", "equity=9-5"], "NAME=HH:MM"),
                       (["--stale", "0"], "--stale")):
        rc, text = status(capsys, "--dsn", db, *args)
        assert rc == 2 and says in text and text.count("\n") == 1, text


def test_status_of_a_running_daemon(capsys, tmp_path, db):
    """The daemon's own config names the database, spool, dead-letter folder and metrics:
    status reads them all; a healthy daemon answers 200 and its stream is listed."""
    sim = Simulator(tmp_path, tokens=10, rate=1000)
    load_instruments(db, sim.csv)
    port = free_port()
    d = Daemon(tmp_path, db, sim.url, metrics_port=port)
    try:
        wait_for(lambda: count_ticks(db) > 500, timeout=60, what="500 ticks written")
        (tmp_path / "dead").mkdir(exist_ok=True)
        args = ("--config", str(d.cfg), "--dsn", db, "--stale", "1e9")

        def healthy():
            rc, rep = status_json(capsys, *args)
            return (rc, rep) if rep["daemon"]["status"] == 200 else None

        rc, rep = wait_for(healthy, timeout=30, what="/healthz 200")
        assert rc == 0, rep["attention"]
        assert rep["daemon"]["health"]["feeds"] == {"kite-0": True}
        assert rep["spool"]["dir"] == str(tmp_path / "spool") and rep["spool"]["alarm_bytes"]
        assert rep["dead_letter_batches"]["pending"] == []
        with psycopg.connect(db) as c:
            stream = c.execute("select stream from stream_offsets").fetchone()[0]
        assert stream in [s["stream"] for s in rep["database"]["streams"]]
        assert rep["database"]["newest_ticks"]
        # a batch set aside: the status names it and exits 1
        (tmp_path / "dead" / f"{stream}-1-2.json").write_text(json.dumps(
            {"stream": stream, "first_seq": 1, "last_seq": 2, "reason": "value too long"}))
        rc, text = status(capsys, *args)
        assert rc == 1 and "dead letters: 1 batch(es)" in text and "value too long" in text
    finally:
        sim.stop()
        assert d.terminate() == 0, d.output()
    # the daemon is gone: its /healthz does not answer
    rc, rep = status_json(capsys, "--config", str(d.cfg), "--dsn", db, "--stale", "1e9",
                          "--timeout", "2")
    assert rc == 1 and rep["daemon"]["status"] is None


@pytest.mark.timescale
def test_timescaledb_state_is_reported(capsys, tsdb_db, capture, tmp_path):
    """On TimescaleDB: hypertables, their columnstore/compression statistics and policy jobs
    (read from timescaledb_information without an error on this server's version)."""
    from ingestor.store import timescale as ts
    from ingestor.store.migrate import migrate
    from test_tsdb_storage import _pause_jobs

    with psycopg.connect(tsdb_db, autocommit=True) as conn:
        migrate(conn)
        keep = {t: None for t in ts.DEFAULT_TABLES}  # no retention job may drop 2024's chunks
        assert ts.setup(conn, "on", ts.TimescaleSettings().with_overrides(retention=keep)).enabled
        # a policy run by the scheduler meanwhile (on PostgreSQL 15.20 every background job
        # of a stock 2.28.3 build fails) would rightly be reported as needing attention
        _pause_jobs(conn)
    replay(str(capture), tsdb_db, dead_letter_dir=str(tmp_path / "dead"), progress=False)
    rc, rep = status_json(capsys, "--dsn", tsdb_db, "--at", "2024-08-12T09:15:50")
    d = rep["database"]
    assert rc == 0 and d["errors"] == {} and d["timescaledb"], rep
    for t in d["tables"]:
        assert t["hypertable"] and t["chunks"] >= 1 and t["bytes"] > 0 and t["bytes_today"] > 0
        assert set(t["compression"]) == {"chunks", "compressed_chunks", "bytes_before", "bytes_after"}
    assert {t["table"]: t["rows_today"] for t in d["tables"]}["tick_data"] == 20_000
    assert {j["table"] for j in d["jobs"]} == set(ts.DEFAULT_TABLES)
    rc, text = status(capsys, "--dsn", tsdb_db, "--at", "2024-08-12T09:15:50")
    assert "TimescaleDB" in text and "chunks" in text


def test_sessions_from_the_config_file_and_what_overrides_them(capsys, filled, tmp_path,
                                                              monkeypatch):
    """``--config``'s ``[sessions]`` sets the hours status judges by; INGESTOR_SESSIONS and
    --session go over it."""
    cfg = tmp_path / "ingestor.toml"
    cfg.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[metrics]\nlisten = ""\n'
                   '[sessions]\nequity = "09:15-15:30@none"\n')   # a weekdays-only calendar
    monkeypatch.delenv(market_hours.ENV, raising=False)
    holiday = ("--dsn", filled, "--config", str(cfg), "--at", "2024-08-15T11:00")
    rc, rep = status_json(capsys, *holiday)
    eq = {s["name"]: s for s in rep["sessions"]}["equity"]
    assert eq["open"] and rc == 1, rep                   # open on Independence Day: stale
    assert any(a.startswith("NSE:") for a in rep["attention"])
    rc, rep = status_json(capsys, *holiday, "--session", "equity=09:15-15:30@XNSE")
    assert rc == 0, rep["attention"]                     # the flag goes over the file
    monkeypatch.setenv(market_hours.ENV, "equity=09:15-15:30@XNSE")
    rc, rep = status_json(capsys, *holiday)
    assert rc == 0, rep["attention"]                     # and so does the environment
