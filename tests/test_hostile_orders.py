"""Postbacks that contradict what is known of their order: dead-lettered, never applied.

Issue item 8: COMPLETE without ``filled_quantity`` became final with 0 filled (the real fill,
later, was dropped as stale); COMPLETE without ``average_price`` made an execution at 0; an
average falling from 5 @ 100 to 10 @ 1 made an execution at -98; a SELL of another
instrument for an existing BUY order was applied as a BUY fill of the original instrument.
"""

from __future__ import annotations

import json
from decimal import Decimal

import psycopg
import pytest

from ingestor.orders import OrderStore, PostbackError, decode_postback


def pb(order_id="o1", status="OPEN", filled=None, avg=None, t="09:30:00", qty=10, side="BUY",
       token=779521, **kw) -> str:
    d = dict(order_id=order_id, status=status, instrument_token=token, transaction_type=side,
             order_type="LIMIT", quantity=qty, price=100,
             exchange_update_timestamp=f"2024-01-15 {t}", tag="alpha")
    if filled is not None:
        d["filled_quantity"] = filled
    if avg is not None:
        d["average_price"] = avg
    d.update(kw)
    return json.dumps({"type": "order", "data": d})


@pytest.fixture
def conn(db):
    with psycopg.connect(db) as c:
        yield c


def _executions(conn) -> list:
    return conn.execute("SELECT quantity, price FROM executions ORDER BY id").fetchall()


def _letters(conn) -> dict:
    return dict(conn.execute("SELECT seq, reason FROM postback_dead_letters").fetchall())


def test_complete_without_filled_quantity_is_dead_lettered(conn):
    store = OrderStore()
    res = store.apply_sync(conn, [pb(status="OPEN", filled=0, avg=0, t="09:30:00"),
                                  pb(status="COMPLETE", avg=100, t="09:30:01"),
                                  pb(status="COMPLETE", filled=10, avg=100, t="09:30:02")],
                           [("s", 1), ("s", 2), ("s", 3)])
    assert res.dead_letters == 1 and "COMPLETE with filled_quantity 0" in res.reasons[0]
    # the real fill, later, is applied (it was dropped as stale after a final 0)
    assert _executions(conn) == [(10, Decimal(100))]
    assert list(_letters(conn)) == [2]
    assert conn.execute("SELECT current_status, filled_quantity FROM orders").fetchone() == \
        ("COMPLETE", 10)


@pytest.mark.parametrize("avg", [None, 0])
def test_a_fill_without_average_price_is_dead_lettered(conn, avg):
    res = OrderStore().apply_sync(conn, [pb(status="COMPLETE", filled=10, avg=avg)], [("s", 7)])
    assert res.dead_letters == 1 and "average_price" in res.reasons[0]
    assert _executions(conn) == []
    assert list(_letters(conn)) == [7]


def test_an_average_implying_a_negative_fill_price_is_dead_lettered(conn):
    store = OrderStore()
    res = store.apply_sync(conn, [pb(status="UPDATE", filled=5, avg=100, t="09:30:00"),
                                  pb(status="COMPLETE", filled=10, avg=1, t="09:30:01"),
                                  pb(status="COMPLETE", filled=10, avg=101, t="09:30:02")],
                           [("s", 1), ("s", 2), ("s", 3)])
    assert res.dead_letters == 1
    assert "implies a fill of 5 at -98" in res.reasons[0], res.reasons
    assert _executions(conn) == [(5, Decimal(100)), (5, Decimal(102))]
    assert list(_letters(conn)) == [2]
    assert conn.execute("SELECT quantity, average_entry_price FROM positions").fetchone() == \
        (10, Decimal(101))


def test_the_contradiction_is_found_across_batches(conn):
    """The stored order (an earlier transaction) is what the postback is checked against."""
    store = OrderStore()
    store.apply_sync(conn, [pb(status="UPDATE", filled=5, avg=100, t="09:30:00")], [("s", 1)])
    res = store.apply_sync(conn, [pb(status="COMPLETE", filled=10, avg=1, t="09:30:01")],
                           [("s", 2)])
    assert res.dead_letters == 1 and res.applied == 0
    assert _executions(conn) == [(5, Decimal(100))]


@pytest.mark.parametrize("change", [dict(side="SELL", token=408065), dict(side="SELL"),
                                    dict(token=408065)],
                         ids=["other side and instrument", "other side", "other instrument"])
def test_a_postback_naming_another_instrument_or_side_is_dead_lettered(conn, change):
    store = OrderStore()
    store.apply_sync(conn, [pb(status="UPDATE", filled=5, avg=100, t="09:30:00")], [("s", 1)])
    res = store.apply_sync(conn, [pb(status="COMPLETE", filled=10, avg=100, t="09:30:01",
                                     **change)], [("s", 2)])
    assert res.dead_letters == 1 and res.applied == 0
    assert "contradicts its order" in res.reasons[0]
    assert _executions(conn) == [(5, Decimal(100))]
    assert conn.execute("SELECT quantity FROM positions WHERE status = 'OPEN'").fetchall() == \
        [(5,)]
    assert list(_letters(conn)) == [2]
    # the same contradiction within one batch
    res = store.apply_sync(conn, [pb("o2", status="UPDATE", filled=5, avg=100, t="09:31:00"),
                                  pb("o2", status="COMPLETE", filled=10, avg=100, t="09:31:01",
                                     **change)], [("s", 3), ("s", 4)])
    assert res.dead_letters == 1 and res.applied == 1
    assert 4 in _letters(conn)


def test_self_contradicting_postbacks_fail_to_decode():
    with pytest.raises(PostbackError, match="COMPLETE with filled_quantity 0"):
        decode_postback(pb(status="COMPLETE"))
    with pytest.raises(PostbackError, match="average_price"):
        decode_postback(pb(status="UPDATE", filled=3))
    # what is consistent still decodes: OPEN with nothing filled and no average
    assert decode_postback(pb(status="OPEN")).filled_quantity == 0
    assert decode_postback(pb(status="CANCELLED", filled=0)).status == "CANCELLED"
