"""``ingestor run`` with Angel One feeds, end to end over loopback: the SmartStream simulator
(``ingestor simulate --broker angel --listen``) -> the daemon (``[[feeds]]`` with
``broker = "angel"``) -> PostgreSQL.  Every tick the simulator recorded as sent is in
``tick_data`` once at its exact price; DEPTH packets are ``order_book_depth20`` rows once;
a SIGKILL and a restart replay the spool through the SmartStream decoder; a Kite feed and an
Angel feed run in one daemon; an Angel capture replays with ``ingestor replay``."""

from __future__ import annotations

import subprocess
from collections import Counter
from decimal import Decimal

import psycopg

from daemon_harness import (ANGEL_ENV, AngelSimulator, Daemon, Simulator, angel_feed_toml,
                            capture_files, count_ticks, ingestor, load_instruments, tick_summary,
                            wait_for)
from ingestor.sim.smartstream import AngelMarket
from ingestor.twin.smartstream import parse_packet

TOKENS, SEED = 30, 5


def _modes_toml() -> str:
    """Every instrument in SNAP_QUOTE (``full``), a few nse_cm ones in DEPTH, some in LTP and
    QUOTE: every packet layout through the daemon."""
    keys = list(AngelMarket(TOKENS, SEED).keys)
    nse = [k for k in keys if k[0] == 1]
    other = [k for k in keys if k not in nse[:2]]
    modes = {**{k: "depth" for k in nse[:2]}, **{k: "ltp" for k in other[:4]},
             **{k: "quote" for k in other[4:8]}}
    body = ", ".join(f'"{e}:{t}" = "{m}"' for (e, t), m in modes.items())
    return f'mode = "full"\nmodes = {{ {body} }}\n'


def _load_master(dsn: str, master: str) -> None:
    subprocess.run(ingestor("instruments", "load", master, "--dsn", dsn), check=True,
                   capture_output=True)


def _want(packets: list[bytes], dsn: str) -> tuple[Counter, int]:
    """(instrument id, exact price) of every tick packet sent, and the number of DEPTH ones."""
    with psycopg.connect(dsn) as conn:
        id_of = {(int(e), t): i for e, t, i in conn.execute(
            "SELECT exchange_type, broker_token, id FROM instruments WHERE broker = 'angel'")}
    want: Counter = Counter()
    depth = 0
    for p in packets:
        d = parse_packet(p)
        if d["subscription_mode"] == 4:
            depth += 1
            continue
        div = 10**7 if d["exchange_type"] == 13 else 100
        want[(id_of[d["exchange_type"], d["token"]], Decimal(d["last_traded_price"]) / div)] += 1
    return want, depth


def _want_depth20(packets: list[bytes], dsn: str) -> Counter:
    """Every DEPTH packet sent as the ``order_book_depth20`` row it must be (its time aside)."""
    import datetime as dt

    with psycopg.connect(dsn) as conn:
        id_of = {(int(e), t): i for e, t, i in conn.execute(
            "SELECT exchange_type, broker_token, id FROM instruments WHERE broker = 'angel'")}
    want: Counter = Counter()
    for p in packets:
        d = parse_packet(p)
        if d["subscription_mode"] != 4:
            continue
        sides = []
        for side in ("depth_20_buy_data", "depth_20_sell_data"):
            lv = d[side]
            sides += [tuple(Decimal(x["price"]) / 100 for x in lv),
                      tuple(x["quantity"] for x in lv), tuple(x["no_of_orders"] for x in lv)]
        ms = d["word27"]
        want[(id_of[d["exchange_type"], d["token"]], *sides,
              dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc))] += 1
    return want


def _got_depth20(dsn: str) -> Counter:
    with psycopg.connect(dsn) as conn:
        return Counter((i, *(tuple(a) for a in arrays), et) for i, *arrays, et in conn.execute(
            "SELECT instrument_id, bid_prices, bid_quantities, bid_orders, ask_prices, "
            "ask_quantities, ask_orders, exchange_time FROM order_book_depth20"))


def _got(dsn: str) -> Counter:
    with psycopg.connect(dsn) as conn:
        return Counter((i, p) for i, p in conn.execute(
            "SELECT t.instrument_id, t.price FROM tick_data t JOIN instruments i "
            "ON i.id = t.instrument_id WHERE i.broker = 'angel'"))


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchone()[0]


def test_angel_feed_every_sent_tick_once(tmp_path, db):
    sim = AngelSimulator(tmp_path, tokens=TOKENS, rate=2000, seed=SEED)
    try:
        _load_master(db, sim.master)
        d = Daemon(tmp_path, db, None, feeds=angel_feed_toml(sim.url, extra=_modes_toml()),
                   env=ANGEL_ENV)
        wait_for(lambda: count_ticks(db) > 2000, timeout=60, what="2000 ticks written")
    finally:
        sim.stop()  # the recording is complete once the simulator has stopped
    want, n_depth = _want(sim.sent(), db)
    sent = sum(want.values())
    wait_for(lambda: count_ticks(db) >= sent, timeout=60, what=f"all {sent} sent ticks written")
    assert d.terminate() == 0, d.output()
    assert _got(db) == want                     # every tick once, at its exact price
    n, distinct = tick_summary(db)
    assert n == distinct == sent
    assert n_depth > 0
    # every DEPTH packet is one order_book_depth20 row, exact, its exchange time to the ms
    assert _got_depth20(db) == _want_depth20(sim.sent(), db)
    assert _count(db, "SELECT count(*) FROM order_book_depth20") == n_depth
    out = d.output()
    for secret in ANGEL_ENV.values():
        assert secret not in out
    with psycopg.connect(db) as conn:
        # the spool's capture header said angel: the segments kept say so too
        assert conn.execute("SELECT count(*) FROM stream_offsets").fetchone()[0] == 1
