"""Angel One instruments: the master (OpenAPIScripMaster.json) through ``ingestor instruments
load``, broker-scoped keys beside Kite's, tokens first met on the feed, hostile masters."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from ingestor._core import SmartStreamDecoder
from ingestor.store import instruments as ins
from ingestor.twin.smartstream import encode_ltp

ROWS = [
    {"token": "3045", "symbol": "SBIN-EQ", "name": "SBIN", "expiry": "", "strike": "-1.000000",
     "lotsize": "1", "instrumenttype": "", "exch_seg": "NSE", "tick_size": "5.000000"},
    {"token": "99926000", "symbol": "Nifty 50", "name": "NIFTY", "expiry": "",
     "strike": "0.000000", "lotsize": "1", "instrumenttype": "AMXIDX", "exch_seg": "NSE",
     "tick_size": "0.000000"},
    {"token": "35001", "symbol": "NIFTY27FEB2522000CE", "name": "NIFTY", "expiry": "27FEB2025",
     "strike": "2200000.000000", "lotsize": "75", "instrumenttype": "OPTIDX",
     "exch_seg": "NFO", "tick_size": "5.000000"},
    {"token": "1185", "symbol": "USDINR25FEBFUT", "name": "USDINR", "expiry": "26FEB2025",
     "strike": "-1.000000", "lotsize": "1", "instrumenttype": "FUTCUR", "exch_seg": "CDS",
     "tick_size": "0.250000"},
    {"token": "3045", "symbol": "SBIN", "name": "SBIN", "expiry": "", "strike": "-1.000000",
     "lotsize": "1", "instrumenttype": "", "exch_seg": "BSE", "tick_size": "5.000000"},
]


def write(tmp_path, rows, name="OpenAPIScripMaster.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows) if not isinstance(rows, str) else rows)
    return path


def cli(*args, dsn="host=127.0.0.1 port=1 user=nobody dbname=none"):
    return subprocess.run([sys.executable, "-m", "ingestor", "instruments", "load", *map(str, args),
                           "--dsn", dsn], capture_output=True, text=True, timeout=120)


def test_master_loads_with_engine_keys_beside_kite(db, tmp_path):
    # a Kite instrument whose token string equals an Angel token, and the same (exchange,
    # symbol) under both brokers: two instruments
    kite = tmp_path / "kite.csv"
    kite.write_text(",".join(ins.COLUMNS) + "\n"
                    "3045,11,SBIN-EQ,SBIN,0,,0,0.05,1,EQ,NSE,NSE\n")
    assert cli(kite, dsn=db).returncode == 0
    r = cli(write(tmp_path, ROWS), dsn=db)
    assert r.returncode == 0, r.stderr
    assert "Angel One: 5 instruments: 5 new" in r.stdout
    with psycopg.connect(db) as conn:
        got = {(e, t): (k, ex, sym, tick, strike, exp, lot) for e, t, k, ex, sym, tick, strike,
               exp, lot in conn.execute(
                   "SELECT exchange_type, broker_token, instrument_token, exchange, symbol, "
                   "tick_size, strike_price, expiry_date::text, lot_size FROM instruments "
                   "WHERE broker = 'angel'")}
        kite_row = conn.execute("SELECT instrument_token, exchange, symbol FROM instruments "
                                "WHERE broker = 'kite'").fetchall()
    assert kite_row == [(3045, "NSE", "SBIN-EQ")]
    assert set(got) == {(1, "3045"), (1, "99926000"), (2, "35001"), (13, "1185"), (3, "3045")}
    key, exch, sym, tick, strike, exp, lot = got[(1, "3045")]
    assert (exch, sym, str(tick), strike) == ("NSE", "SBIN-EQ", "0.0500000", None)
    assert key & 0xFF == 1 and key >> 8 > 1_000_000 and key != 3045
    assert str(got[(2, "35001")][4]) == "22000.0000000" and got[(2, "35001")][5] == "2025-02-27"
    assert got[(2, "35001")][6] == 75
    assert got[(13, "1185")][0] & 0xFF == 3 and str(got[(13, "1185")][3]) == "0.0025000"
    assert got[(3, "3045")][1] == "BSE" and got[(3, "3045")][0] & 0xFF == 4
    assert len({v[0] for v in got.values()}) == 5

    # a second load changes nothing and keeps the keys; a changed row is updated by its key
    rows = [dict(r) for r in ROWS]
    rows[0]["lotsize"] = "2"
    r = cli(write(tmp_path, rows), dsn=db)
    assert "0 new, 1 updated, 4 unchanged" in r.stdout, r.stdout
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT instrument_token, lot_size FROM instruments WHERE "
                            "broker = 'angel' AND broker_token = '3045' AND exchange_type = 1"
                            ).fetchone() == (key, 2)
        assert ins.angel_keys(conn).__len__() == 5


def test_feed_tokens_register_once_and_the_master_names_them(db, tmp_path):
    with psycopg.connect(db, autocommit=True) as conn:
        k1 = ins.register_angel(conn, 2, "40000")
        assert ins.register_angel(conn, 2, "40000") == k1
        assert k1 & 0xFF == 2
        iid = conn.execute("SELECT id FROM instruments WHERE instrument_token = %s",
                           (k1,)).fetchone()[0]
        # the pipeline's id lookup of Angel keys reads, never registers
        assert ins.register_tokens(conn, [k1], broker="angel") == {k1: iid}
        with pytest.raises(RuntimeError, match="could not register"):
            ins.register_tokens(conn, [k1 - 256], broker="angel")
        # a Kite registration of a token equal to the Angel key is refused, not merged
        with pytest.raises(RuntimeError, match="could not register"):
            ins.register_tokens(conn, [k1])
    rows = [{"token": "40000", "symbol": "BANKNIFTY27FEB25FUT", "name": "BANKNIFTY",
             "expiry": "27FEB2025", "strike": "-1", "lotsize": "30", "instrumenttype": "FUTIDX",
             "exch_seg": "NFO", "tick_size": "5"}]
    assert cli(write(tmp_path, rows), dsn=db).returncode == 0
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT id, instrument_token, symbol FROM instruments WHERE "
                            "broker = 'angel'").fetchall() == [(iid, k1, "BANKNIFTY27FEB25FUT")]


def test_decoder_resolves_through_the_registry(db):
    with psycopg.connect(db, autocommit=True) as conn:
        dec = SmartStreamDecoder(16)
        dec.resolver = lambda etype, token: ins.register_angel(conn, etype, token)
        for k, (et, tok) in enumerate([(1, "3045"), (13, "1185"), (1, "3045"), (7, "100")]):
            assert dec.feed(encode_ltp(et, tok, 100 + k))
        keys = dict(((e, t), k) for e, t, k in ins.angel_keys(conn))
        assert [int(x) for x in dec.ticks["instrument_token"][:4]] == \
            [keys[1, "3045"], keys[13, "1185"], keys[1, "3045"], keys[7, "100"]]
        assert conn.execute("SELECT exchange FROM instruments WHERE broker_token = '100'"
                            ).fetchone() == ("NCDEX",)
        # a second decoder (another connection, a restart) preloads the same keys
        again = SmartStreamDecoder(16)
        again.add_keys(ins.angel_keys(conn))
        again.resolver = lambda *a: pytest.fail("every token is known")
        assert again.feed(encode_ltp(13, "1185", 1))
        assert int(again.ticks["instrument_token"][0]) == keys[13, "1185"]


def test_bad_rows_are_set_aside_and_counted(db, tmp_path):
    rows = [dict(ROWS[0])] + [
        {**ROWS[0], "token": ""},
        {**ROWS[0], "token": "x" * 26},
        {**ROWS[0], "token": "12 3"},
        {**ROWS[0], "token": "7", "exch_seg": "XYZ"},
        {**ROWS[0], "token": "8", "expiry": "31FEB2025"},
        {**ROWS[0], "token": "9", "strike": "1e99999999"},
        {**ROWS[0], "token": "10", "tick_size": "-5"},
        {**ROWS[0], "token": "11", "lotsize": "abc"},
        {**ROWS[0], "token": "12", "symbol": ""},
        {**ROWS[0], "token": "13", "symbol": "X" * 100_000},
        {**ROWS[0], "token": 14, "symbol": ["a"]},
        "not an object", 17, None, [1, 2],
        {**ROWS[0], "token": "15", "symbol": "SBIN\x00"},
    ]
    r = cli(write(tmp_path, rows), dsn=db)
    assert r.returncode == 0, r.stderr
    assert "Angel One: 1 instruments: 1 new" in r.stdout
    assert "16 row(s) set aside" in r.stderr
    assert len(r.stderr) < 3000   # the 100 KB symbol is not echoed
    read = ins.read_angel(write(tmp_path, rows))
    assert sum(read.rejected.values()) == 16 and len(read.rows) == 1


@pytest.mark.parametrize("text", [
    "[", "[{]", "{}", '{"token": "1"}', "[1, 2", "\ufeff[" + "[" * 100_000 + "]" * 100_000 + "]",
    "\x00\x01\x02", "[" + "[" * 5000 + "]" * 5000 + "]",
])
def test_malformed_master_exits_2_with_one_line(tmp_path, text):
    path = tmp_path / "master.json"
    path.write_text(text)
    r = cli(path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and len(r.stderr) < 600, r.stderr


def test_same_symbol_twice_in_one_file_keeps_the_later(tmp_path):
    rows = [dict(ROWS[0]), {**ROWS[0], "token": "9999"}]
    read = ins.read_angel(write(tmp_path, rows))
    assert [(r.token, r.symbol, r.is_active) for r in read.rows] == \
        [("3045", "SBIN-EQ [3045]", False), ("9999", "SBIN-EQ", True)]
