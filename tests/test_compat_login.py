"""Login users of the compatibility schemas (``ingestor migrate --compat ... --login-users``).

On the real server: the user logs in with the password from the environment, reads its
schema's views under its own search path, cannot read ingestor's tables nor write; a second
run sets a new password; ``--drop-compat`` drops the users it created and only those.  The
password appears in no output, log or statement.  Roles are cluster-wide on the shared
server: every role here has a unique name and is dropped at the end of its test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import secrets

import psycopg
import pytest
from psycopg import sql

from conftest import _conninfo
from ingestor.cli import main
from ingestor.logs import redact
from ingestor.store import compat, roles


def _matches(verifier: str, user: str, password: str) -> bool:
    """Whether the stored verifier is that of ``password`` (checked here, independently of
    the server's authentication method: the test server may trust local connections)."""
    if verifier.startswith("SCRAM-SHA-256$"):
        # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (RFC 5802/5803)
        head, keys = verifier[len("SCRAM-SHA-256$"):].split("$")
        iterations, salt = head.split(":")
        stored = keys.split(":")[0]
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                     int(iterations))
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        return hashlib.sha256(client_key).digest() == base64.b64decode(stored)
    if verifier.startswith("md5"):
        return verifier == "md5" + hashlib.md5((password + user).encode()).hexdigest()
    return False


def _verifier(admin, name: str) -> str | None:
    row = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)
                        ).fetchone()
    return row and row[0]


def _exists(admin, name: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() \
        is not None


@contextlib.contextmanager
def _dropping(db, *names):
    """Drop these roles at the end, whatever happened."""
    try:
        yield
    finally:
        with psycopg.connect(db, autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _migrate(db, *argv) -> int:
    return main(["migrate", "--dsn", db, "--timescale", "off", *argv])


def _one_candle(db) -> tuple[str, object]:
    """An instrument and one 1m candle, for the login user to read through the views."""
    with psycopg.connect(db) as admin:
        iid = admin.execute("INSERT INTO instruments (instrument_token, exchange, symbol) "
                            "VALUES (738561, 'NSE', 'RELIANCE') RETURNING id").fetchone()[0]
        admin.execute(
            "INSERT INTO ohlc_candles (time, instrument_id, timeframe, open_price, high_price, "
            "low_price, close_price, volume, trade_count) VALUES "
            "('2024-11-06 03:45+00', %s, '1m', 1290.05, 1291.5, 1289.95, 1290.1234567, 1200, 9)",
            (iid,))
    from decimal import Decimal

    return "RELIANCE", Decimal("1290.1234567")


def test_login_users_log_in_read_their_views_and_take_a_new_password(db, monkeypatch, capsys):
    tag = secrets.token_hex(4)
    quant, octo, hand = f"t_quant_{tag}", f"t_octo_{tag}", f"t_hand_{tag}"
    first, other, second = (f"pw-{secrets.token_urlsafe(12)}" for _ in range(3))
    monkeypatch.setenv(compat.password_variable(quant), first)
    monkeypatch.setenv(compat.password_variable(octo), other)
    symbol, close = _one_candle(db)
    seen = []

    def output() -> str:
        out, err = capsys.readouterr()
        seen.append(out + err)
        return out

    with _dropping(db, quant, octo, hand):
        # --debug: the log (on stderr, captured) at its most verbose
        assert _migrate(db, "--debug", "--compat", "001,004", "--login-users",
                        f"001={quant},004={octo}") == 0
        out = output()
        assert f"login user {quant} created" in out and f"login user {octo} created" in out
        assert compat.password_variable(quant) in out
        with psycopg.connect(db) as admin:
            assert _matches(_verifier(admin, quant), quant, first)
            assert _matches(_verifier(admin, octo), octo, other)
            assert not _matches(_verifier(admin, quant), quant, other)
            assert admin.execute(
                "SELECT rolcanlogin, rolinherit, rolsuper, rolcreaterole, rolcreatedb "
                "FROM pg_roles WHERE rolname = %s", (quant,)).fetchone() == (
                True, True, False, False, False)
            assert admin.execute(
                "SELECT pg_has_role(%s, 'compat_quant_reader', 'MEMBER'), "
                "pg_has_role(%s, 'compat_octopus_reader', 'MEMBER')", (quant, quant)
            ).fetchone() == (True, False)

        # the user logs in with its password; its own search path is its schema
        with psycopg.connect(_conninfo(db, user=quant, password=first)) as conn:
            assert conn.execute("SHOW search_path").fetchone()[0] == "compat_quant"
            assert conn.execute(
                "SELECT symbol, close FROM market_data WHERE symbol = %s", (symbol,)
            ).fetchall() == [(symbol, close)]
            for rel in compat_relations("001"):
                conn.execute(f"SELECT * FROM {rel} LIMIT 1").fetchall()
            conn.commit()
            for stmt in ("SELECT 1 FROM public.ohlc_candles LIMIT 1",
                         "SELECT 1 FROM public.tick_data LIMIT 1",
                         "SELECT 1 FROM public.instruments LIMIT 1",
                         "SELECT 1 FROM public.orders LIMIT 1",
                         "SELECT 1 FROM compat_octopus.market_data LIMIT 1",
                         "INSERT INTO public.instruments (instrument_token, exchange, symbol) "
                         "VALUES (1, 'NSE', 'Z')",
                         "CREATE TABLE compat_quant.mine (x int)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(stmt)
                conn.rollback()
        with psycopg.connect(_conninfo(db, user=octo, password=other)) as conn:
            assert conn.execute("SELECT symbol, close_price FROM market_data").fetchall() == [
                (symbol, close)]

        # a second run sets the password again: one user, the new password
        monkeypatch.setenv(compat.password_variable(quant), second)
        assert _migrate(db, "--compat", "001,004", "--login-users", f"001={quant}") == 0
        assert f"login user {quant} password set again" in output()
        with psycopg.connect(db) as admin:
            assert _matches(_verifier(admin, quant), quant, second)
            assert not _matches(_verifier(admin, quant), quant, first)
            assert admin.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (quant,)
                                 ).fetchone()[0] == 1
        with psycopg.connect(_conninfo(db, user=quant, password=second)) as conn:
            assert conn.execute("SELECT count(*) FROM market_data").fetchone()[0] == 1

        # --drop-compat drops the users it created, not a member made by hand
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {hand} LOGIN IN ROLE compat_quant_reader")
        assert _migrate(db, "--drop-compat", "001,004") == 0
        out = output()
        assert f"login user {quant} dropped" in out and f"login user {octo} dropped" in out
        assert hand not in out
        with psycopg.connect(db) as admin:
            assert not _exists(admin, quant) and not _exists(admin, octo)
            assert _exists(admin, hand)

    text = "\n".join(seen)
    for pw in (first, other, second):
        assert pw not in text


def compat_relations(code: str) -> list[str]:
    from test_compat import SEED_COLUMNS

    return list(SEED_COLUMNS[code])


def test_login_users_refusals_change_nothing(db, monkeypatch, capsys):
    tag = secrets.token_hex(4)
    name = f"t_login_{tag}"
    var = compat.password_variable(name)
    assert var == f"INGESTOR_COMPAT_PASSWORD_T_LOGIN_{tag.upper()}"
    monkeypatch.delenv(var, raising=False)
    with _dropping(db, name):
        # the variable missing: one line naming it, exit 2, before anything is created
        assert _migrate(db, "--compat", "001", "--login-users", f"001={name}") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and var in err
        with psycopg.connect(db) as admin:
            assert compat.present(admin) == {} and not _exists(admin, name)
        monkeypatch.setenv(var, "")
        assert _migrate(db, "--compat", "001", "--login-users", f"001={name}") == 2
        assert var in capsys.readouterr().err
        monkeypatch.setenv(var, "k3y!9")
        assert _migrate(db, "--compat", "001", "--login-users", f"001={name}") == 2
        err = capsys.readouterr().err
        assert "shorter than 8" in err and "k3y!9" not in err
        monkeypatch.setenv(var, "a-long-enough-password")
        for argv, words in (
                (["--compat", "001", "--login-users", f"002={name}"], "not among the schemas"),
                (["--compat", "001", "--login-users", "001=Bad-Name"], "invalid login user"),
                (["--compat", "001", "--login-users", "001=pg_svc"], "invalid login user"),
                (["--compat", "001,004", "--login-users", f"001={name},004={name}"], "taken"),
                (["--compat", "001", "--login-users", "001=compat_quant_reader"], "taken"),
                (["--drop-compat", "001", "--login-users", f"001={name}"], "need --compat")):
            assert _migrate(db, *argv) == 2, argv
            err = capsys.readouterr().err
            assert words in err and "a-long-enough-password" not in err, argv
        # a role of that name that ingestor did not create: refused, left as it was, and the
        # schemas of the same run not created either (one transaction)
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {name} NOLOGIN")
        assert _migrate(db, "--compat", "001", "--login-users", f"001={name}") == 2
        err = capsys.readouterr().err
        assert "ingestor did not create" in err and "a-long-enough-password" not in err
        with psycopg.connect(db) as admin:
            assert admin.execute("SELECT rolcanlogin, rolpassword IS NULL FROM pg_authid "
                                 "WHERE rolname = %s", (name,)).fetchone() == (False, True)
            assert compat.present(admin) == {}
        # and --drop-compat leaves it alone
        assert _migrate(db, "--compat", "001") == 0
        assert _migrate(db, "--drop-compat", "001") == 0
        assert name not in capsys.readouterr().out
        with psycopg.connect(db) as admin:
            assert _exists(admin, name)


def test_statements_carry_the_verifier_not_the_password(db):
    password = f"pw-{secrets.token_urlsafe(12)}"
    with psycopg.connect(db) as conn:
        verifier = roles.password_verifier(conn, "some_user", password)
        assert _matches(verifier, "some_user", password)
        stmts = roles.login_user_sql("some_user", verifier, "compat_quant_reader", "market",
                                     "compat_quant", create=True)
        text = "\n".join(s.as_string(conn) for s in stmts)
    assert verifier in text and password not in text
    # both are redacted from any text from now on
    assert password not in redact(f"failed with {password} and {verifier}")
    assert verifier not in redact(f"failed with {password} and {verifier}")


def test_parse_login_users_names_and_defaults():
    env = {"INGESTOR_COMPAT_PASSWORD_COMPAT_QUANT_LOGIN": "password-one",
           "INGESTOR_COMPAT_PASSWORD_OCTO_SVC": "password-two"}
    users = compat.parse_login_users("1, 004=octo_svc", ["001", "004"], env)
    assert [(u.code, u.name, u.variable) for u in users] == [
        ("001", "compat_quant_login", "INGESTOR_COMPAT_PASSWORD_COMPAT_QUANT_LOGIN"),
        ("004", "octo_svc", "INGESTOR_COMPAT_PASSWORD_OCTO_SVC")]
    assert "password" not in repr(users)
    env["INGESTOR_COMPAT_PASSWORD_COMPAT_OCTOPUS_LOGIN"] = "password-three"
    assert [u.name for u in compat.parse_login_users("all", ["001", "004"], env)] == [
        "compat_quant_login", "compat_octopus_login"]
    with pytest.raises(compat.CompatError, match="named twice"):
        compat.parse_login_users("001=a_b,001=c_d", ["001"], env)
