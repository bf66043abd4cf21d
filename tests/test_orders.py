"""Order postbacks into orders, order_history, executions and positions, on a real PostgreSQL.

The oracle for positions is an independent average-cost replay over ``executions`` (written
here, not the store's), and for executions the fills implied by the simulator's final orders.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import threading
import time
from decimal import ROUND_HALF_EVEN, Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import VECTORS
from ingestor.store.migrate import migrate
from ingestor.orders import (
    IST,
    OrderStore,
    PostbackError,
    decode_postback,
    mark_from_ticks,
    mark_to_market,
)
from ingestor.sim.orders import OrderFlow
from ingestor.orders.store import DERIVED_PLACES, derive_fill_price, mark_to_market_loop

SAMPLE = os.path.join(VECTORS, "postback.json")
INSTRUMENTS = [(779521, "NSE", "SBIN", "470.35"), (408065, "NSE", "INFY", "1573.70"),
               (884737, "NSE", "TATAMOTORS", "392.95"),
               (1368834, "CDS", "USDINR24JANFUT", "83.1225", "0.0025")]
TABLES = ("orders", "order_history", "executions", "positions", "strategies",
          "postback_dead_letters")


# --------------------------------------------------------------------------------------------
# decoding (no database)


def _sample() -> dict:
    with open(SAMPLE) as fh:
        return json.load(fh)


def test_decode_sample_every_field():
    raw = open(SAMPLE, "rb").read()
    pb = decode_postback(raw)
    doc = _sample()
    # every documented field of the official sample is an attribute with the sample's value
    for key, value in doc.items():
        got = getattr(pb, key)
        if key.endswith("timestamp"):
            assert got == dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=IST)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert got == Decimal(str(value)), key
        else:
            assert got == value, key
    # zone-less timestamps are India's: 09:24:25 IST is 03:54:25 UTC
    assert pb.order_timestamp.astimezone(dt.timezone.utc) == dt.datetime(
        2022, 3, 3, 3, 54, 25, tzinfo=dt.timezone.utc)
    assert isinstance(pb.average_price, Decimal) and pb.average_price == 470
    assert pb.is_terminal and pb.strategy_tag is None


def test_decode_envelope_extra_keys_and_exact_prices():
    doc = _sample()
    doc.update(average_price=1573.7, price=83.1225, new_field={"x": [1, 2]}, tags=["alpha"],
               exchange_update_timestamp="2022-03-03T09:24:25+00:00")
    env = json.dumps({"type": "order", "data": doc})
    pb = decode_postback(env)
    assert pb.average_price == Decimal("1573.7") and str(pb.price) == "83.1225"
    assert pb.strategy_tag == "alpha"
    # an explicit offset is honoured
    assert pb.exchange_update_timestamp.utcoffset() == dt.timedelta(0)
    # missing optional fields are fine
    minimal = {k: doc[k] for k in ("order_id", "status", "instrument_token",
                                   "transaction_type", "order_type", "quantity")}
    minimal["status"] = "OPEN"  # (COMPLETE with nothing filled contradicts itself)
    pb = decode_postback(json.dumps(minimal).encode())
    assert pb.filled_quantity == 0 and pb.average_price is None


@pytest.mark.parametrize("mutate, reason", [
    (lambda d: "{not json", "not a JSON object"),
    (lambda d: json.dumps([d]), "not a JSON object"),
    (lambda d: json.dumps({"type": "error", "data": "token expired"}), "not an order message"),
    (lambda d: json.dumps({"type": "order", "data": None}), "without data"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "order_id"}), "order_id"),
    (lambda d: json.dumps(dict(d, transaction_type="HOLD")), "transaction_type"),
    (lambda d: json.dumps(dict(d, order_type="ICEBERG")), "order_type"),
    (lambda d: json.dumps(dict(d, filled_quantity=2)), "exceeds quantity"),
    (lambda d: json.dumps(dict(d, quantity=-1, filled_quantity=0)), "quantity"),
    (lambda d: json.dumps(dict(d, average_price=-5)), "negative"),
    (lambda d: json.dumps(dict(d, average_price=1e12)), "NUMERIC(18,7)"),
    (lambda d: json.dumps(dict(d, instrument_token=0)), "instrument_token"),
    (lambda d: json.dumps(dict(d, order_timestamp="yesterday")), "order_timestamp"),
    (lambda d: json.dumps(dict(d, tradingsymbol="SB\x00IN")), "NUL"),
])
def test_decode_errors_give_the_reason(mutate, reason):
    with pytest.raises(PostbackError) as ei:
        decode_postback(mutate(_sample()))
    assert reason in str(ei.value)


def test_derive_fill_price_exact():
    # 3 @ 470 then 7 more, average 470.35 over 10: the 7 cost (4703.5 - 1410) / 7 = 470.5
    assert derive_fill_price(Decimal(470), 3, Decimal("470.35"), 10) == Decimal("470.5")
    # a non-terminating quotient is rounded half-even at DERIVED_PLACES:
    # (100.01 * 4 - 100 * 1) / 3 = 100.01333...
    p = derive_fill_price(Decimal(100), 1, Decimal("100.01"), 4)
    assert p == Decimal("100.013333333333")
    assert -p.as_tuple().exponent == DERIVED_PLACES


def test_simulator_is_seeded_and_decodes():
    a = OrderFlow(INSTRUMENTS, seed=5)
    b = OrderFlow(INSTRUMENTS, seed=5)
    ma, mb = a.next_messages(200) + a.drain(), b.next_messages(200) + b.drain()
    assert ma == mb
    assert OrderFlow(INSTRUMENTS, seed=6).next_messages(50) != ma[:50]
    statuses = set()
    fields = set(_sample())
    for m in ma:
        env = json.loads(m)
        assert env["type"] == "order" and set(env["data"]) == fields
        pb = decode_postback(m)
        statuses.add(pb.status)
    assert {"OPEN", "UPDATE", "COMPLETE"} <= statuses
    assert all(d["status"] in ("COMPLETE", "CANCELLED", "REJECTED") for d in a.final.values())


# --------------------------------------------------------------------------------------------
# database fixtures and checks


@pytest.fixture(scope="module")
def orders_db(pg_server_dsn):
    """A database of this module's own, migrated once; tables emptied per test."""
    name = f"ingestor_orders_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = make_conninfo(**dict(conninfo_to_dict(pg_server_dsn), dbname=name))
    with psycopg.connect(dsn) as conn:
        migrate(conn)
    try:
        yield dsn
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def _clean(conn):
    conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
    conn.commit()


@pytest.fixture
def db(orders_db):
    with psycopg.connect(orders_db) as conn:
        _clean(conn)
        yield conn


def _snapshot(conn) -> dict:
    return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}


_E12 = Decimal(1).scaleb(-DERIVED_PLACES)


def _oracle_positions(executions):
    """Average-cost replay of executions in id order: per pair, the list of rows."""
    out: dict = {}
    for sid, iid, side, q, p in executions:
        q = q if side == "BUY" else -q
        rows = out.setdefault((sid, iid), [])
        if not rows or rows[-1][0] == 0:
            rows.append([q, p, Decimal(0)])
            continue
        row = rows[-1]
        Q, A = row[0], row[1]
        if (Q > 0) == (q > 0):
            row[1] = ((abs(Q) * A + abs(q) * p) / (abs(Q) + abs(q))).quantize(
                _E12, rounding=ROUND_HALF_EVEN)
            row[0] = Q + q
            continue
        n = min(abs(Q), abs(q))
        row[2] += n * (p - A) * (1 if Q > 0 else -1)
        if abs(q) <= abs(Q):
            row[0] = Q + q
        else:
            row[0] = 0
            rows.append([Q + q, p, Decimal(0)])
    return out


def check_consistent(conn, final: dict | None = None):
    """Positions = replay of executions; executions = the fills the orders imply."""
    import decimal

    decimal.getcontext().prec = 80
    ex = conn.execute("SELECT strategy_id, instrument_id, transaction_type, quantity, price "
                      "FROM executions ORDER BY id").fetchall()
    want = _oracle_positions(ex)
    got: dict = {}
    for sid, iid, q, a, r, status in conn.execute(
            "SELECT strategy_id, instrument_id, quantity, average_entry_price, realized_pnl, "
            "status FROM positions ORDER BY id"):
        assert status == ("OPEN" if q else "CLOSED")
        got.setdefault((sid, iid), []).append([q, a, r])
    assert got == want

    orders = conn.execute(
        "SELECT o.id, o.broker_order_id, o.current_status, o.filled_quantity, o.average_price, "
        "o.quantity, coalesce(sum(e.quantity), 0), coalesce(sum(e.quantity * e.price), 0), "
        "count(e.id) FROM orders o LEFT JOIN executions e ON e.order_id = o.id GROUP BY o.id"
    ).fetchall()
    for oid, boid, status, filled, avg, qty, fq, value, n in orders:
        # every fill the order implies is there, once: quantities add up exactly, and the
        # value to within the rounding of each derived price (half a unit of the last place)
        assert fq == filled, boid
        assert abs(value - filled * (avg or 0)) <= n * filled * _E12 / 2, boid
        if final is not None:
            f = final[boid]
            assert (status, filled, qty) == (f["status"], f["filled_quantity"], f["quantity"])
            assert avg == Decimal(str(f["average_price"])), boid
    if final is not None:
        assert {o[1] for o in orders} == set(final)
    # history: a row per status change, ending at the current status
    hist: dict = {}
    for oid, status in conn.execute("SELECT order_id, status FROM order_history ORDER BY id"):
        hist.setdefault(oid, []).append(status)
    for oid, boid, status, *_ in orders:
        h = hist[oid]
        assert h[-1] == status and all(a != b for a, b in zip(h, h[1:])), (boid, h)


def _flow_messages(seed, n=150, **kw):
    flow = OrderFlow(INSTRUMENTS, seed=seed, **kw)
    return flow, flow.next_messages(n) + flow.drain()


# --------------------------------------------------------------------------------------------
# store


def _pb(order_id="o1", status="OPEN", filled=0, avg=0, t="09:30:00", qty=10, side="BUY",
        tag="alpha", token=779521, **kw) -> str:
    d = dict(order_id=order_id, status=status, instrument_token=token, transaction_type=side,
             order_type="LIMIT", quantity=qty, filled_quantity=filled, average_price=avg,
             price=470, exchange_update_timestamp=f"2024-01-15 {t}", tag=tag,
             exchange="NSE", tradingsymbol="SBIN")
    d.update(kw)
    return json.dumps({"type": "order", "data": d})


def test_sample_postback_end_to_end(db):
    store = OrderStore()
    res = store.apply_sync(db, [open(SAMPLE, "rb").read()])
    assert (res.orders_inserted, res.executions, res.history, res.positions_opened) == (1, 1, 1, 1)
    row = db.execute("SELECT o.broker_order_id, o.strategy_id, o.current_status, "
                     "o.average_price, i.instrument_token, o.order_timestamp, "
                     "o.last_postback->>'guid' FROM orders o JOIN instruments i "
                     "ON i.id = o.instrument_id").fetchone()
    assert row[:5] == ("220303000308932", "default", "COMPLETE", Decimal(470), 779521)
    assert row[5] == dt.datetime(2022, 3, 3, 3, 54, 25, tzinfo=dt.timezone.utc)
    assert row[6] == "XXXXXX"
    assert db.execute("SELECT quantity, price FROM executions").fetchall() == [(1, Decimal(470))]
    assert db.execute("SELECT quantity, average_entry_price, status FROM positions").fetchall() \
        == [(1, Decimal(470), "OPEN")]
    assert db.execute("SELECT id FROM strategies").fetchall() == [("default",)]


def test_fills_positions_and_flip_through_zero(db):
    store = OrderStore()
    store.apply_sync(db, [
        _pb("b1", "OPEN", 0, 0, "09:30:00"),
        _pb("b1", "UPDATE", 4, 100, "09:30:01"),
        _pb("b1", "COMPLETE", 10, "100.6", "09:30:02"),       # 6 more @ 101
    ])
    # sell 15 @ 103: closes the 10 (realized 10 * (103 - 100.6) = 24), opens short 5 @ 103
    store.apply_sync(db, [_pb("s1", "COMPLETE", 15, 103, "09:31:00", qty=15, side="SELL")])
    # buy 2 @ 99 against the short: realized 2 * (103 - 99) = 8
    store.apply_sync(db, [_pb("b2", "COMPLETE", 2, 99, "09:32:00", qty=2)])
    ex = db.execute("SELECT transaction_type, quantity, price, filled_quantity_after "
                    "FROM executions ORDER BY id").fetchall()
    assert ex == [("BUY", 4, 100, 4), ("BUY", 6, 101, 10), ("SELL", 15, 103, 15),
                  ("BUY", 2, 99, 2)]
    pos = db.execute("SELECT quantity, average_entry_price, realized_pnl, status, closed_at "
                     "IS NOT NULL FROM positions ORDER BY id").fetchall()
    assert pos == [(0, Decimal("100.6"), 24, "CLOSED", True),
                   (-3, Decimal(103), 8, "OPEN", False)]
    hist = db.execute("SELECT status FROM order_history h JOIN orders o ON o.id = h.order_id "
                      "WHERE o.broker_order_id = 'b1' ORDER BY h.id").fetchall()
    assert hist == [("OPEN",), ("UPDATE",), ("COMPLETE",)]
    check_consistent(db)


def test_same_postbacks_again_change_nothing(db, rng):
    flow, msgs = _flow_messages(rng.randrange(1 << 30), 120)
    store = OrderStore()
    store.apply_sync(db, msgs)
    before = _snapshot(db)
    res = OrderStore().apply_sync(db, msgs)               # all again, one batch
    rng.shuffle(msgs)
    for i in range(0, len(msgs), 7):                      # and again, shuffled, small batches
        r = store.apply_sync(db, msgs[i:i + 7])
        assert r.applied == 0
    assert res.applied == 0 and res.stale == len(msgs)
    assert _snapshot(db) == before
    check_consistent(db, flow.final)


def test_older_postbacks_do_not_move_an_order_back(db):
    store = OrderStore()
    store.apply_sync(db, [_pb("o1", "UPDATE", 5, 100, "09:30:05")])
    res = store.apply_sync(db, [_pb("o1", "OPEN", 0, 0, "09:30:00"),
                                _pb("o1", "UPDATE", 3, 100, "09:30:09")])  # fewer fills
    assert res.applied == 0 and res.stale == 2
    assert db.execute("SELECT current_status, filled_quantity FROM orders").fetchone() \
        == ("UPDATE", 5)
    # a modification at the same fill but later is newer
    res = store.apply_sync(db, [_pb("o1", "UPDATE", 5, 100, "09:30:07", price=471)])
    assert res.applied == 1
    assert db.execute("SELECT price FROM orders").fetchone() == (Decimal(471),)


def test_terminal_statuses_are_final(db):
    store = OrderStore()
    store.apply_sync(db, [_pb("c1", "UPDATE", 2, 100, "09:30:01"),
                          _pb("c1", "CANCELLED", 2, 100, "09:30:02", cancelled_quantity=8),
                          _pb("r1", "REJECTED", 0, 0, "09:30:00")])
    res = store.apply_sync(db, [
        _pb("c1", "UPDATE", 5, 100, "09:31:00"),          # more fills, later: ignored
        _pb("c1", "OPEN", 2, 100, "09:32:00"),
        _pb("r1", "OPEN", 0, 0, "09:31:00"),
        _pb("r1", "COMPLETE", 10, 100, "09:31:01"),
    ])
    assert res.applied == 0 and res.stale == 4
    assert db.execute("SELECT broker_order_id, current_status, filled_quantity FROM orders "
                      "ORDER BY 1").fetchall() == [("c1", "CANCELLED", 2), ("r1", "REJECTED", 0)]
    assert db.execute("SELECT sum(quantity) FROM executions").fetchone() == (2,)
    check_consistent(db)


def test_dead_letters_kept_with_reason_and_place(db):
    store = OrderStore()
    msgs = [_pb("ok1"), "{broken", json.dumps({"type": "order", "data": {"order_id": "x"}}),
            b"\xff\xfe not utf-8", _pb("ok2", filled=20)]       # filled > quantity
    places = [("kite-0", 10 + k) for k in range(len(msgs))]
    res = store.apply_sync(db, msgs, places)
    assert (res.received, res.dead_letters, res.applied) == (5, 4, 1)
    rows = db.execute("SELECT stream, seq, reason, payload FROM postback_dead_letters "
                      "ORDER BY seq").fetchall()
    assert [r[1] for r in rows] == [11, 12, 13, 14]
    assert "malformed" in rows[0][2] or "JSON" in rows[0][2]
    assert "status" in rows[1][2]
    assert "filled_quantity 20 exceeds quantity 10" in rows[3][2]
    assert rows[0][3] == "{broken" and rows[2][3].startswith("\\xff\\xfe")
    # the same places again: not stored twice
    store.apply_sync(db, msgs, places)
    assert db.execute("SELECT count(*) FROM postback_dead_letters").fetchone() == (4,)


def test_a_postback_the_database_refuses_is_dead_lettered_alone(db):
    # decodes (an unknown key is skipped), but jsonb cannot hold the number
    poison = _pb("p2").replace('"tag"', '"extra": 1e1000000, "tag"')
    res = OrderStore().apply_sync(db, [_pb("p1"), poison, _pb("p3")])
    assert (res.applied, res.dead_letters) == (2, 1)
    assert "refused by the database" in res.reasons[0]
    assert db.execute("SELECT broker_order_id FROM orders ORDER BY 1").fetchall() == \
        [("p1",), ("p3",)]
    assert db.execute("SELECT count(*) FROM postback_dead_letters").fetchone() == (1,)


def test_mark_to_market(db):
    store = OrderStore()
    store.apply_sync(db, [
        _pb("a", "COMPLETE", 10, "100.5", "09:30:00"),
        _pb("b", "COMPLETE", 4, "392.95", "09:30:00", token=884737, side="SELL", qty=4),
        _pb("c", "COMPLETE", 10, 101, "09:30:00", tag="beta"),
        _pb("d", "COMPLETE", 10, 102, "09:31:00", tag="beta", side="SELL"),  # beta flat
    ])
    ids = dict(db.execute("SELECT instrument_token, id FROM instruments").fetchall())
    n = mark_to_market(db, {ids[779521]: Decimal("101.25"), ids[884737]: "390.00"})
    assert n == 2
    rows = db.execute("SELECT strategy_id, quantity, current_price, unrealized_pnl FROM "
                      "positions ORDER BY id").fetchall()
    assert rows == [("alpha", 10, Decimal("101.25"), Decimal("7.5")),
                    ("alpha", -4, Decimal("390"), Decimal("11.8")),
                    ("beta", 0, None, 0)]
    with pytest.raises(TypeError):
        mark_to_market(db, {ids[779521]: 101.25})
    # from the latest tick: one statement over tick_data
    t0 = dt.datetime(2024, 1, 15, 4, 0, tzinfo=dt.timezone.utc)
    for k, price in enumerate(["101", "99.95"]):
        db.execute("INSERT INTO tick_data (time, instrument_id, exchange, price) "
                   "VALUES (%s, %s, 'NSE', %s)", (t0 + dt.timedelta(seconds=k), ids[779521],
                                                  Decimal(price)))
    assert mark_from_ticks(db) == 1
    assert db.execute("SELECT current_price, unrealized_pnl FROM positions WHERE quantity = 10"
                      ).fetchone() == (Decimal("99.95"), Decimal("-5.5"))
    db.execute("INSERT INTO tick_data (time, instrument_id, exchange, price) "
               "VALUES (%s, %s, 'NSE', 100.05)", (t0 + dt.timedelta(seconds=5), ids[779521]))
    db.commit()

    async def loop_once():  # the daemon's cadence loop, stopped after its first mark
        conn = await psycopg.AsyncConnection.connect(db.info.dsn)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_soon(stop.set)
        try:
            await mark_to_market_loop(conn, 0.01, stop)
        finally:
            await conn.close()

    asyncio.run(loop_once())
    assert db.execute("SELECT current_price, unrealized_pnl FROM positions WHERE quantity = 10"
                      ).fetchone() == (Decimal("100.05"), Decimal("-4.5"))
    db.execute("UPDATE positions SET current_price = 99.95 WHERE quantity = 10")
    # a fill after marking keeps unrealized P&L consistent with the mark
    store.apply_sync(db, [_pb("e", "COMPLETE", 10, "99.5", "09:40:00")])
    assert db.execute("SELECT quantity, average_entry_price, unrealized_pnl FROM positions "
                      "WHERE status = 'OPEN' AND strategy_id = 'alpha' AND quantity > 0"
                      ).fetchone() == (20, Decimal(100), Decimal("-1"))
    db.commit()


def test_async_apply_matches(orders_db, rng):
    flow, msgs = _flow_messages(rng.randrange(1 << 30), 100, duplicate=0.2, reorder=0.2)

    async def go():
        conn = await psycopg.AsyncConnection.connect(orders_db)
        try:
            store = OrderStore()
            for i in range(0, len(msgs), 25):
                await store.apply(conn, msgs[i:i + 25])
        finally:
            await conn.close()

    with psycopg.connect(orders_db) as conn:
        _clean(conn)
    asyncio.run(go())
    with psycopg.connect(orders_db) as conn:
        check_consistent(conn, flow.final)


def _state(conn) -> dict:
    """The order tables by content (no generated ids or times): what a batch leaves."""
    q = {
        "orders": "SELECT broker_order_id, strategy_id, current_status, quantity, filled_quantity, "
                  "average_price FROM orders",
        "order_history": "SELECT o.broker_order_id, h.status, h.filled_quantity, h.average_price "
                         "FROM order_history h JOIN orders o ON o.id = h.order_id",
        "executions": "SELECT o.broker_order_id, e.transaction_type, e.quantity, e.price, "
                      "e.filled_quantity_after FROM executions e JOIN orders o ON o.id = e.order_id",
        "positions": "SELECT strategy_id, instrument_id, quantity, average_entry_price, "
                     "realized_pnl, status FROM positions",
    }
    return {t: sorted(map(repr, conn.execute(sql).fetchall())) for t, sql in q.items()}


def test_connection_killed_mid_batch_loses_nothing(orders_db, rng):
    """A batch whose backend is killed mid-transaction leaves no row at all; retried, it leaves
    every row.  The victim is held after it has written orders (it waits for ``positions``), so
    a store that committed table by table would leave those rows behind and fail here."""
    flow, msgs = _flow_messages(rng.randrange(1 << 30), 200)
    half = len(msgs) // 2
    first, batch, rest = msgs[:half // 2], msgs[half // 2:half], msgs[half:]
    # the reference: the same two batches applied without a kill
    with psycopg.connect(orders_db) as conn:
        _clean(conn)
        store = OrderStore()
        store.apply_sync(conn, first)
        store.apply_sync(conn, batch)
        want = _state(conn)
    with psycopg.connect(orders_db, autocommit=True) as admin:
        _clean(admin)
        store = OrderStore()
        with psycopg.connect(orders_db) as conn:
            store.apply_sync(conn, first)                     # some history already committed
        before = _snapshot(admin)
        assert len(want["orders"]) > len(before["orders"]), "the batch must add orders"
        victim = psycopg.connect(orders_db)
        pid = victim.info.backend_pid
        err: list = []

        def run():
            try:
                store.apply_sync(victim, batch)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                err.append(exc)

        # hold positions: the batch blocks after writing orders/executions, mid-transaction
        admin.execute("BEGIN")
        admin.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 30
        with psycopg.connect(orders_db, autocommit=True) as killer:
            while True:
                row = killer.execute("SELECT wait_event_type, backend_xid IS NOT NULL "
                                     "FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
                if row and row[0] == "Lock":
                    break
                assert time.monotonic() < deadline, "the batch never reached positions"
                time.sleep(0.01)
            # it has written: a transaction id (assigned at the first write) and orders locked
            # for writing
            assert row[1], "the victim waits for positions without having written anything"
            held = {r[0] for r in killer.execute(
                "SELECT c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.pid = %s AND l.granted AND l.mode = 'RowExclusiveLock'", (pid,))}
            assert {"orders", "order_history"} <= held, held
            assert killer.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            # the backend is really gone (its transaction ended) before anything is counted
            while killer.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                 (pid,)).fetchone():
                assert time.monotonic() < deadline, "the killed backend never exited"
                time.sleep(0.01)
        th.join(30)
        assert not th.is_alive()
        admin.execute("ROLLBACK")
        assert err and isinstance(err[0], psycopg.OperationalError)
        victim.close()
        # nothing of the killed batch exists: every table exactly as before it
        assert _snapshot(admin) == before
        # retried on a new connection the batch commits whole: what it leaves without a kill
        with psycopg.connect(orders_db) as conn:
            store.apply_sync(conn, batch)
            assert _state(conn) == want
            store.apply_sync(conn, rest)
            check_consistent(conn, flow.final)


# --------------------------------------------------------------------------------------------
# the property: random lifecycles, duplicated and reordered, in random batches


@settings(max_examples=int(os.environ.get("INGESTOR_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 30), orders=st.integers(1, 12),
       duplicate=st.sampled_from([0.0, 0.1, 0.4]), reorder=st.sampled_from([0.0, 0.2, 0.5]),
       strategies=st.integers(1, 3), data=st.data())
def test_property_positions_and_executions(orders_db, seed, orders, duplicate, reorder,
                                           strategies, data):
    flow = OrderFlow(INSTRUMENTS[:2], seed=seed, duplicate=duplicate, reorder=reorder,
                     concurrent=min(orders, 4), max_delay=8,
                     strategies=["s1", "s2", "s3"][:strategies])
    msgs = flow.next_messages(orders * 3) + flow.drain()
    # more disorder than the simulator's own: a random permutation of whole windows
    rnd = data.draw(st.randoms(use_true_random=False))
    w = data.draw(st.integers(1, 20))
    windows = [msgs[i:i + w] for i in range(0, len(msgs), w)]
    for win in windows:
        rnd.shuffle(win)
    msgs = [m for win in windows for m in win]
    sizes = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=8))
    with psycopg.connect(orders_db) as conn:
        _clean(conn)
        store = OrderStore()
        i = k = 0
        while i < len(msgs):
            n = sizes[k % len(sizes)]
            store.apply_sync(conn, msgs[i:i + n])
            i, k = i + n, k + 1
        check_consistent(conn, flow.final)


def test_a_store_survives_deleted_strategies_and_instruments(db):
    # its caches must not turn every later postback into a refused one
    store = OrderStore()
    store.apply_sync(db, [_pb("a1", "COMPLETE", 10, 100, "09:30:00")])
    db.execute("TRUNCATE " + ", ".join(TABLES) + ", instruments CASCADE")
    db.commit()
    res = store.apply_sync(db, [_pb("a2", "COMPLETE", 10, 101, "09:31:00")])
    assert (res.applied, res.dead_letters, res.executions) == (1, 0, 1)
    assert db.execute("SELECT s.id, i.instrument_token FROM orders o JOIN strategies s ON "
                      "s.id = o.strategy_id JOIN instruments i ON i.id = o.instrument_id"
                      ).fetchall() == [("alpha", 779521)]


def test_bench_orders_quick_runs(pg_server_dsn):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ingestor", "bench", "--only", "orders", "--quick",
                        "--dsn", pg_server_dsn], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 per transaction" in r.stdout and "batches of 100" in r.stdout
    assert "dead-lettered" not in r.stderr


# --------------------------------------------------------------------------------------------
# hostile postbacks: dead-lettered with a reason, never raised, the rest of the batch applied


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


HOSTILE = {
    "long order_id": _pb("x" * 4000),
    "long exchange_order_id": _pb("h2", exchange_order_id="9" * 300),
    "long tag": _pb("h3", tag="t" * 1000),
    "long tradingsymbol": _pb("h4", tradingsymbol="S" * 257),
    "nested meta": _pb("h5").replace('"tag"', '"meta": {"a": ' + _deep(1000) + '}, "tag"'),
    "nested unknown key": _pb("h6").replace('"tag"', '"extra": ' + _deep(1000) + ', "tag"'),
    "nested envelope": '{"type": "order", "x": ' + _deep(20_000) + ', "data": {}}',
    "huge message": _pb("h7", status_message="m" * 10, padding="p" * 200_000),
    "year 1": _pb("h8", order_timestamp="0001-01-01 00:00:00"),
    "far future": _pb("h9", exchange_update_timestamp="2999-01-01 09:30:00"),
    "token 2**32": _pb("h10", token=1 << 32),
    "token 0": _pb("h11", token=0),
    "token -1": _pb("h12", token=-1),
}


def test_hostile_postbacks_are_dead_lettered_and_the_rest_applied(db):
    store = OrderStore()
    msgs = [_pb("ok1")] + list(HOSTILE.values()) + [_pb("ok2")]
    places = [("kite-9", k) for k in range(len(msgs))]
    res = store.apply_sync(db, msgs, places)
    assert (res.received, res.applied, res.dead_letters) == (len(msgs), 2, len(HOSTILE))
    assert db.execute("SELECT broker_order_id FROM orders ORDER BY 1").fetchall() == \
        [("ok1",), ("ok2",)]
    reasons = dict(db.execute("SELECT seq, reason FROM postback_dead_letters").fetchall())
    assert sorted(reasons) == list(range(1, len(HOSTILE) + 1))
    for k, name in enumerate(HOSTILE, start=1):
        why = reasons[k]
        expect = {"long": "length <= ", "nested": "nested deeper", "huge": "exceeds",
                  "year": "not a plausible time", "far": "not a plausible time",
                  "token": "instrument_token"}[name.split()[0]]
        assert expect in why, (name, why)


def test_hostile_postbacks_decode_to_postback_error_only():
    for name, msg in HOSTILE.items():
        with pytest.raises(PostbackError):
            decode_postback(msg)
    # a plausible one still decodes, and a nesting of a few levels in meta is fine
    pb = decode_postback(_pb("fine", meta={"a": {"b": [1, [2, {"c": 3}]]}}))
    assert pb.meta == {"a": {"b": [1, [2, {"c": 3}]]}}
    # brackets inside strings do not count as nesting
    assert decode_postback(_pb("s", status_message="[{" * 2000)).status_message == "[{" * 2000


def test_a_postback_whose_index_row_is_too_large_is_dead_lettered(db):
    """54000 (index row size exceeds the btree maximum) is the content's fault: that postback
    is dead-lettered and the others of the batch applied -- not raised as a lost connection
    (the writer retried that forever).  An operator's index on a free-text column makes it
    reachable past the decoder's identifier bounds."""
    db.execute("CREATE INDEX orders_status_message_idx ON orders (status_message)")
    db.commit()
    try:
        big = _pb("p2", status_message=secrets.token_hex(2000))     # 4000 incompressible chars
        res = OrderStore().apply_sync(db, [_pb("p1"), big, _pb("p3")], [("s", 1), ("s", 2), ("s", 3)])
        assert (res.applied, res.dead_letters) == (2, 1)
        assert "54000" in res.reasons[0] and "refused by the database" in res.reasons[0]
        assert db.execute("SELECT broker_order_id FROM orders ORDER BY 1").fetchall() == \
            [("p1",), ("p3",)]
        assert db.execute("SELECT seq FROM postback_dead_letters").fetchall() == [(2,)]
    finally:
        db.rollback()
        db.execute("DROP INDEX orders_status_message_idx")
        db.commit()


def test_a_deeply_nested_postback_does_not_stop_the_writer(orders_db, tmp_path):
    """Through the daemon's path (the writer's flush transaction): the batch is written, the
    postback kept in postback_dead_letters."""
    from ingestor.pipeline import FlushBatch
    from ingestor.store.writer import Writer, postback_handler

    with psycopg.connect(orders_db) as conn:
        _clean(conn)
    texts = [(0, _pb("w1").encode()), (1, HOSTILE["nested unknown key"].encode()),
             (2, HOSTILE["long order_id"].encode()), (3, _pb("w2").encode())]
    stream = f"pb-{secrets.token_hex(3)}"
    w = Writer(orders_db, dead_letter_dir=str(tmp_path / "dead"), retry_for=5,
               on_texts=postback_handler())

    async def scenario():
        try:
            return await w.write(FlushBatch(stream, 0, 3, texts=texts))
        finally:
            await w.close()

    assert asyncio.run(scenario()) == "written"
    with psycopg.connect(orders_db) as conn:
        assert conn.execute("SELECT broker_order_id FROM orders ORDER BY 1").fetchall() == \
            [("w1",), ("w2",)]
        assert conn.execute("SELECT seq FROM postback_dead_letters WHERE stream = %s ORDER BY 1",
                            (stream,)).fetchall() == [(1,), (2,)]
        assert conn.execute("SELECT committed_seq FROM stream_offsets WHERE stream = %s",
                            (stream,)).fetchone() == (3,)
