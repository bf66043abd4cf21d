"""Instruments loads, feed token registration, stream offsets and roles, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import os
import secrets

import psycopg
import pytest

from conftest import VECTORS
from ingestor.store import instruments as ins
from ingestor.store import offsets, roles

DUMP = os.path.join(VECTORS, "instruments_all.csv")


def _dump_rows(path=DUMP):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ins.COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _row(token, symbol, exchange="NSE", **kw):
    r = dict(instrument_token=str(token), exchange_token=str(token >> 8), tradingsymbol=symbol,
             name=kw.get("name", symbol), last_price="0.0", expiry=kw.get("expiry", ""),
             strike=kw.get("strike", "0.0"), tick_size="0.05", lot_size="1",
             instrument_type="EQ", segment=exchange, exchange=exchange)
    return r


# --------------------------------------------------------------------------------------------
# dump loads


def test_load_dump_matches_file_and_second_load_changes_nothing(db):
    rows = _dump_rows()
    with psycopg.connect(db) as conn:
        res = ins.load_csv(conn, DUMP)
        tokens = {int(r["instrument_token"]) for r in rows}
        assert res.rows == len(tokens) and res.inserted == len(tokens)
        got = {t: (ex, sym, ts, lot) for t, ex, sym, ts, lot in conn.execute(
            "SELECT instrument_token, exchange, symbol, tick_size::text, lot_size FROM instruments")}
        for r in rows:
            t = int(r["instrument_token"])
            ex, sym, ts, lot = got[t]
            assert (ex, lot) == (r["exchange"], int(r["lot_size"]))
            assert float(ts) == float(r["tick_size"])
        stamp = conn.execute("SELECT max(updated_at) FROM instruments").fetchone()[0]
        again = ins.load_csv(conn, DUMP)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, len(tokens))
        assert conn.execute("SELECT max(updated_at) FROM instruments").fetchone()[0] == stamp


def test_changed_row_is_updated_by_token_keeping_its_id(db, tmp_path):
    rows = _dump_rows()
    with psycopg.connect(db) as conn:
        ins.load_csv(conn, DUMP)
        token = int(rows[3]["instrument_token"])
        old_id = conn.execute("SELECT id FROM instruments WHERE instrument_token = %s",
                              (token,)).fetchone()[0]
        rows[3]["name"] = "RENAMED CO"
        rows[3]["lot_size"] = "25"
        res = ins.load_csv(conn, _write(tmp_path / "d.csv", rows))
        assert (res.inserted, res.updated) == (0, 1)
        assert conn.execute("SELECT id, name, lot_size FROM instruments WHERE instrument_token = %s",
                            (token,)).fetchone() == (old_id, "RENAMED CO", 25)


def test_symbol_taken_by_another_token_moves_to_the_new_token(db, tmp_path):
    with psycopg.connect(db) as conn:
        ins.load_csv(conn, _write(tmp_path / "a.csv", [_row(1001, "ACME"), _row(2001, "BETA")]))
        # next day: ACME is token 3001 (symbol reused); BETA and 1001 swap nothing else
        res = ins.load_csv(conn, _write(tmp_path / "b.csv", [_row(3001, "ACME")]))
        assert (res.inserted, res.renamed) == (1, 1)
        got = dict(conn.execute("SELECT instrument_token, (symbol, is_active)::text "
                                "FROM instruments").fetchall())
        assert got[3001] == "(ACME,t)"
        assert got[1001] == '("ACME [1001]",f)'
        assert got[2001] == "(BETA,t)"


def test_two_tokens_swapping_symbols(db, tmp_path):
    with psycopg.connect(db) as conn:
        ins.load_csv(conn, _write(tmp_path / "a.csv", [_row(1001, "X"), _row(2001, "Y")]))
        ids = dict(conn.execute("SELECT instrument_token, id FROM instruments").fetchall())
        ins.load_csv(conn, _write(tmp_path / "b.csv", [_row(1001, "Y"), _row(2001, "X")]))
        got = {t: (i, s, a) for t, i, s, a in conn.execute(
            "SELECT instrument_token, id, symbol, is_active FROM instruments")}
        assert got == {1001: (ids[1001], "Y", True), 2001: (ids[2001], "X", True)}


def test_duplicates_within_one_file(db, tmp_path):
    rows = [_row(1001, "X", name="first"), _row(2001, "X"), _row(1001, "Z", name="last")]
    # token 1001 twice: the later line wins (symbol Z); then X is only 2001's
    with psycopg.connect(db) as conn:
        res = ins.load_csv(conn, _write(tmp_path / "d.csv", rows))
        assert res.rows == 2
        got = dict(conn.execute("SELECT instrument_token, (symbol, name)::text FROM instruments"))
        assert got == {1001: "(Z,last)", 2001: "(X,X)"}
        rows = [_row(1001, "X"), _row(2001, "X")]
        ins.load_csv(conn, _write(tmp_path / "e.csv", rows))
        got = dict(conn.execute("SELECT instrument_token, (symbol, is_active)::text "
                                "FROM instruments"))
        assert got == {1001: '("X [1001]",f)', 2001: "(X,t)"}


def test_deactivate_missing(db, tmp_path):
    with psycopg.connect(db) as conn:
        ins.load_csv(conn, _write(tmp_path / "a.csv", [_row(1001, "A"), _row(2001, "B")]))
        res = ins.load_csv(conn, _write(tmp_path / "b.csv", [_row(2001, "B")]),
                           deactivate_missing=True)
        assert res.deactivated == 1
        assert dict(conn.execute("SELECT instrument_token, is_active FROM instruments")) == {
            1001: False, 2001: True}


@pytest.mark.parametrize("content, line, what", [
    ("", 1, "empty file"),
    ("a,b,c\n1,2,3\n", 1, "missing column"),
    (",".join(ins.COLUMNS) + "\n1,1,A,n,0,,0,0.05,1,EQ,NSE,NSE\nxx,1,B,n,0,,0,0.05,1,EQ,NSE,NSE\n",
     3, "instrument_token"),
    (",".join(ins.COLUMNS) + "\n1,1,A,n,0,,0,0.05,1,EQ,NSE,NSE\n2,1,B,n,0,2024-13-40,0,0.05,1,EQ,NSE,NSE\n",
     3, "expiry"),
    (",".join(ins.COLUMNS) + "\n1,1,A,n,0,,0,0.05,1,EQ,NSE\n", 2, "fields"),
    (",".join(ins.COLUMNS) + "\n1,1,,n,0,,0,0.05,1,EQ,NSE,NSE\n", 2, "tradingsymbol"),
    (",".join(ins.COLUMNS) + "\n1,1,A,n,0,,0,abc,1,EQ,NSE,NSE\n", 2, "tick_size"),
])
def test_malformed_dump_names_the_line(tmp_path, content, line, what):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(ins.InstrumentsFileError, match=rf"bad\.csv:{line}: .*{what}"):
        ins.read_csv(p)


def test_missing_dump_file(tmp_path):
    with pytest.raises(ins.InstrumentsFileError, match="cannot read"):
        ins.read_csv(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# tokens from the feed


@pytest.mark.parametrize("token, exchange", [
    (408065, "NSE"), (256265, "NSE"), (0x1234_02, "NFO"), (0x55_03, "CDS"), (0x77_04, "BSE"),
    (0x10_07, "MCX"), (0x10_08, "MCXSX"), (0x10_0C, "NCO"), (0x10_C8, "SEG200"),
])
def test_exchange_from_segment_byte(token, exchange):
    assert ins.exchange_of(token) == exchange


def test_register_unknown_tokens_then_dump_names_them(db, tmp_path):
    with psycopg.connect(db) as conn:
        ins.load_csv(conn, _write(tmp_path / "a.csv", [_row(1001 << 8 | 1, "KNOWN")]))
        known_id = ins.load_ids(conn)[1001 << 8 | 1]
        toks = [1001 << 8 | 1, 256265, 0x4242_02, 0x99_C8]
        ids = ins.register_tokens(conn, toks + [256265])
        assert set(ids) == set(toks) and ids[1001 << 8 | 1] == known_id
        assert len(set(ids.values())) == len(toks)
        rows = {t: (ex, sym, seg, act) for t, ex, sym, seg, act in conn.execute(
            "SELECT instrument_token, exchange, symbol, segment, is_active FROM instruments")}
        assert rows[256265] == ("NSE", "TOKEN:256265", "INDICES", True)
        assert rows[0x4242_02] == ("NFO", f"TOKEN:{0x4242_02}", "NFO", True)
        assert rows[0x99_C8][0] == "SEG200"
        assert ins.register_tokens(conn, toks) == ids  # idempotent
        assert ins.load_ids(conn) == {**ids}
        # a later dump names the placeholder by token: same id, real symbol
        ins.load_csv(conn, _write(tmp_path / "b.csv", [_row(256265, "NIFTY 50")]))
        assert ins.load_ids(conn)[256265] == ids[256265]
        assert conn.execute("SELECT symbol FROM instruments WHERE instrument_token = 256265"
                            ).fetchone() == ("NIFTY 50",)


def test_register_tokens_commits_on_an_idle_connection(db):
    with psycopg.connect(db) as a, psycopg.connect(db) as b:
        ids = ins.register_tokens(a, [408065])
        assert ins.load_ids(b) == ids  # visible to others at once


def test_async_twins(db):
    async def go():
        async with await psycopg.AsyncConnection.connect(db) as conn:
            ids = await ins.aregister_tokens(conn, [408065, 884737])
            assert await ins.aload_ids(conn) == ids
            async with conn.transaction():
                assert await offsets.acommitted(conn, "s") == offsets.NONE
                assert await offsets.aadvance(conn, "s", 9) == 9
            async with conn.transaction():
                assert await offsets.acommitted(conn, "s", lock=True) == 9
    asyncio.run(go())


# --------------------------------------------------------------------------------------------
# stream offsets


def test_offsets_are_monotonic_and_transactional(db):
    with psycopg.connect(db) as conn:
        assert offsets.committed(conn, "live-1") == offsets.NONE
        with conn.transaction():
            assert offsets.advance(conn, "live-1", 5) == 5
        with conn.transaction():
            assert offsets.advance(conn, "live-1", 3) == 5  # never back
        try:
            with conn.transaction():
                offsets.advance(conn, "live-1", 100)
                raise RuntimeError("the flush failed")
        except RuntimeError:
            pass
        assert offsets.committed(conn, "live-1") == 5  # rolled back with the rows
        with conn.transaction():
            offsets.advance(conn, "cap-2", 0)
        assert offsets.all_offsets(conn) == {"live-1": 5, "cap-2": 0}
        with pytest.raises(ValueError):
            offsets.advance(conn, "x", -5)


# --------------------------------------------------------------------------------------------
# roles


@pytest.fixture
def role_names(db):
    names = (f"t_reader_{secrets.token_hex(4)}", f"t_writer_{secrets.token_hex(4)}")
    yield names
    with psycopg.connect(db, autocommit=True) as conn:
        for n in names:
            if _role_exists(conn, n):
                conn.execute(f'DROP OWNED BY "{n}"')
            conn.execute(f'DROP ROLE IF EXISTS "{n}"')


def _role_exists(conn, name):
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()


def test_roles_idempotent_and_reader_cannot_write(db, role_names):
    reader, writer = role_names
    with psycopg.connect(db) as conn:
        roles.ensure_roles(conn, reader, writer)
        roles.ensure_roles(conn, reader, writer)  # twice: no error
        assert _role_exists(conn, reader) and _role_exists(conn, writer)
    # autocommit, so SET ROLE is not undone by the rollback of a failed statement
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{reader}"')
        assert conn.execute("SELECT count(*) FROM tick_data").fetchone() == (0,)
        for stmt in ("INSERT INTO stream_offsets (stream, committed_seq) VALUES ('x', 1)",
                     "UPDATE instruments SET is_active = false",
                     "INSERT INTO instruments (instrument_token, exchange, symbol) VALUES (1, 'NSE', 'Z')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
        conn.execute(f'SET ROLE "{writer}"')
        assert conn.execute("SELECT current_user").fetchone() == (writer,)
        ins.register_tokens(conn, [408065])  # identity sequence usable
        with conn.transaction():
            offsets.advance(conn, "w", 1)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO schema_migrations VALUES (777, 'x', 'y')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM stream_offsets")
        conn.execute("RESET ROLE")
        # default privileges: a table a later migration creates is readable by the reader
        conn.execute("CREATE TABLE later_table (x int)")
        conn.execute(f'SET ROLE "{reader}"')
        assert conn.execute("SELECT count(*) FROM later_table").fetchone() == (0,)
        conn.execute("RESET ROLE")


def test_role_names_are_validated():
    for bad in ("", "1abc", 'x"; drop table t; --', "a" * 64, "with space"):
        with pytest.raises(roles.RoleError):
            roles.check_name(bad)

