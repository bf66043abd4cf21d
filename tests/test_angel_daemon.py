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

from daemon_harness import (ANGEL_ENV, AngelSimulator, Daemon, Simulator, angel_all_written,
                            angel_feed_toml, angel_modes_toml, angel_sent_ticks,
                            angel_stored_ticks, capture_files, count_ticks, ingestor,
                            load_angel_master, load_instruments, tick_summary, wait_for)
from ingestor.twin.smartstream import parse_packet

TOKENS, SEED = 30, 5


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


def _count(dsn: str, sql: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchone()[0]


def test_angel_feed_every_sent_tick_once(tmp_path, db):
    sim = AngelSimulator(tmp_path, tokens=TOKENS, rate=2000, seed=SEED)
    try:
        load_angel_master(db, sim.master)
        d = Daemon(tmp_path, db, None, feeds=angel_feed_toml(sim.url, extra=angel_modes_toml(TOKENS, SEED)),
                   env=ANGEL_ENV)
        wait_for(lambda: count_ticks(db) > 2000, timeout=60, what="2000 ticks written")
    finally:
        sim.stop()  # the recording is complete once the simulator has stopped
    want, n_depth = angel_all_written(sim, db, timeout=60)
    sent = sum(want.values())
    assert d.terminate() == 0, d.output()
    assert angel_stored_ticks(db) == want                     # every tick once, at its exact price
    # exchange_time keeps the exchange's milliseconds (the simulator's LTP and QUOTE packets
    # carry its clock's)
    assert any(et is not None and et.microsecond for _, _, et in want)
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


def _captured(*dirs) -> list[bytes]:
    """The binary packets of the capture files under ``dirs`` (a daemon's recording and
    spool), in receive order; every file's header says angel."""
    from ingestor.feed.capture import KIND_BINARY, CaptureReader

    out = []
    for path in capture_files(*dirs):
        with CaptureReader(path) as rd:
            assert rd.header.broker == "angel", path
            out += [bytes(r.payload) for r in rd.records() if r.kind == KIND_BINARY]
    return out


def test_angel_sigkill_and_restart_replays_the_spool_with_its_decoder(tmp_path, db):
    sim = AngelSimulator(tmp_path, tokens=TOKENS, rate=2000, seed=SEED)
    feeds = angel_feed_toml(sim.url, extra=angel_modes_toml(TOKENS, SEED))
    record = f'[record]\ndir = "{tmp_path / "rec"}"\n'
    try:
        load_angel_master(db, sim.master)
        d = Daemon(tmp_path, db, None, feeds=feeds, env=ANGEL_ENV, config=record)
        wait_for(lambda: count_ticks(db) > 1000, timeout=60, what="1000 ticks written")
        d.kill()                            # SIGKILL: no flush, no cleanup
        assert list((tmp_path / "spool").glob("*.cap")), "the killed daemon's stream is spooled"
        d2 = Daemon(tmp_path, db, None, feeds=feeds, env=ANGEL_ENV, config=record,
                    name="daemon2")
        wait_for(lambda: count_ticks(db) > 3000, timeout=60, what="3000 ticks written")
    finally:
        sim.stop()
    assert d2.terminate() == 0, d2.output()
    assert "replayed spool" in d2.output()
    # exactly every tick either daemon received (the killed one's spool, replayed through the
    # SmartStream decoder, and the second one's stream), once, at its exact price
    packets = _captured(tmp_path / "rec", tmp_path / "spool")
    want, n_depth = angel_sent_ticks(packets, db)
    assert angel_stored_ticks(db) == want
    n, distinct = tick_summary(db)
    assert n == distinct == sum(want.values()) > 3000
    assert _got_depth20(db) == _want_depth20(packets, db)
    assert _count(db, "SELECT count(*) FROM stream_offsets") == 2


def test_kite_and_angel_feeds_in_one_daemon(tmp_path, db):
    kite = Simulator(tmp_path, tokens=20, rate=1500)
    angel = AngelSimulator(tmp_path, tokens=TOKENS, rate=1500, seed=SEED)
    feeds = (f'[[feeds]]\nname = "kite"\nbroker = "kite"\nurl = "{kite.url}"\nmode = "full"\n'
             'api_key_env = "KITE_API_KEY"\naccess_token_env = "KITE_ACCESS_TOKEN"\n'
             "heartbeat_timeout = 2.0\nreconnect_min = 0.1\nreconnect_max = 0.5\n"
             + angel_feed_toml(angel.url, extra=angel_modes_toml(TOKENS, SEED)))
    try:
        load_instruments(db, kite.csv)
        load_angel_master(db, angel.master)
        d = Daemon(tmp_path, db, None, feeds=feeds, env=ANGEL_ENV)
        both = ("SELECT count(DISTINCT i.broker) FROM tick_data t JOIN instruments i "
                "ON i.id = t.instrument_id")
        wait_for(lambda: count_ticks(db) > 3000 and _count(db, both) == 2, timeout=60,
                 what="3000 ticks of both brokers written")
    finally:
        kite.stop()
        angel.stop()
    want, _ = angel_sent_ticks(angel.sent(), db)
    n_kite = kite.sent_packets()
    wait_for(lambda: count_ticks(db) >= n_kite + sum(want.values()), timeout=60,
             what="every sent tick written")
    assert d.terminate() == 0, d.output()
    assert angel_stored_ticks(db) == want
    n, distinct = tick_summary(db)
    assert n == distinct == n_kite + sum(want.values())
    with psycopg.connect(db) as conn:
        labels = {r[0] for r in conn.execute("SELECT stream FROM stream_offsets")}
    assert {s.split("-")[0] for s in labels} == {"kite", "angel"}
    for secret in (*ANGEL_ENV.values(), "test-token-secret"):
        assert secret not in d.output()


def test_replay_and_decode_of_an_angel_capture(tmp_path, db):
    import json

    from test_smartstream_oracle import _client

    cap, master = tmp_path / "a.cap", tmp_path / "master.json"
    subprocess.run(ingestor("simulate", "--broker", "angel", "--out", str(cap), "--ticks", "3000",
                            "--tokens", str(TOKENS), "--seed", str(SEED), "--mode", "mixed",
                            "--scrip-master", str(master)), check=True, capture_output=True)
    load_angel_master(db, str(master))
    r = subprocess.run(ingestor("replay", str(cap), "--dsn", db, "--no-progress"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    packets = _captured(cap.parent)
    want, n_depth = angel_sent_ticks(packets, db)
    assert n_depth > 0 and angel_stored_ticks(db) == want
    assert _got_depth20(db) == _want_depth20(packets, db)
    # a second replay: the stream's offset is committed, nothing is written twice
    r = subprocess.run(ingestor("replay", str(cap), "--dsn", db, "--no-progress"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert angel_stored_ticks(db) == want
    assert _count(db, "SELECT count(*) FROM order_book_depth20") == n_depth
    # decode --jsonl: one line per packet, the official client's dict (plus recv_ns)
    r = subprocess.run(ingestor("decode", str(cap), "--jsonl"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    client = _client()
    assert len(lines) == len(packets)
    for line, frame in zip(lines, packets):
        assert isinstance(line.pop("recv_ns"), int)
        assert line == client._parse_binary_data(frame)
    assert "snap_quote" in r.stderr and "(angel)" in r.stderr


def _write_credentials(path, feed_token: str) -> None:
    path.write_text("# Angel One, refreshed daily\napi_key=angel-api-key\nclient_code=A123456\n"
                    f"jwt=jwt-of-{feed_token}\nfeed_token={feed_token}\n")


def test_expired_feed_token_said_clearly_then_fresh_file_on_sighup(tmp_path, db):
    """The daily refresh: the simulator takes only today's feed token; the daemon starts with
    yesterday's (HTTP 401: said once, clearly, no secret in it), waits (rejected_retry is long),
    and on SIGHUP reads the credentials file again -- rewritten by the operator -- and
    connects at once."""
    import signal

    creds = tmp_path / "angel.env"
    _write_credentials(creds, "feed-day-one")
    sim = AngelSimulator(tmp_path, "--expected-token", "feed-day-two", tokens=TOKENS,
                         rate=1000, seed=SEED)
    try:
        load_angel_master(db, sim.master)
        d = Daemon(tmp_path, db, None, env={},
                   feeds=angel_feed_toml(sim.url, credentials_file=creds, rejected_retry=3600))
        wait_for(lambda: "HTTP 401" in d.output(), timeout=60, what="the refused login said")
        assert count_ticks(db) == 0
        _write_credentials(creds, "feed-day-two")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: count_ticks(db) > 200, timeout=60, what="ticks after the fresh tokens")
    finally:
        sim.stop()
    assert d.terminate() == 0, d.output()
    out = d.output()
    assert "expire daily" in out and "credentials file" in out
    assert out.count("HTTP 401") == 1
    for secret in ("feed-day-one", "feed-day-two", "jwt-of-feed-day", "angel-api-key"):
        assert secret not in out


def test_an_angel_gap_names_the_registry_keys_of_its_subscriptions(tmp_path, db):
    """``feed_gaps.tokens`` of an Angel One connection: the engine keys of its subscriptions,
    looked up as the gap is written (a feed process has no decoder to ask them of)."""
    from ingestor.daemon import AngelSubscriptions, gap_row_sql
    from ingestor.sim.smartstream import AngelMarket

    master = tmp_path / "OpenAPIScripMaster.json"
    subprocess.run(ingestor("simulate", "--broker", "angel", "--tokens", str(TOKENS), "--seed",
                            str(SEED), "--out", str(tmp_path / "a.cap"), "--ticks", "10",
                            "--scrip-master", str(master)), check=True, capture_output=True)
    load_angel_master(db, str(master))
    keys = sorted(AngelMarket(TOKENS, SEED).keys)[:5]
    subs = AngelSubscriptions(keys + [(1, "no-such-token")])  # an unknown one is left out
    with psycopg.connect(db) as conn:
        key_of = {(int(e), t): k for e, t, k in conn.execute(
            "SELECT exchange_type, broker_token, instrument_token FROM instruments "
            "WHERE broker = 'angel'")}
        want = sorted(key_of[k] for k in keys)
        conn.execute(*gap_row_sql(("angel-0", "s1", "2026-11-27T04:00:00Z", None, "test", subs)))
        got = conn.execute("SELECT tokens FROM feed_gaps WHERE connection = 'angel-0'"
                           ).fetchone()[0]
        # a Kite gap keeps its tokens as they are
        conn.execute(*gap_row_sql(("kite-0", "s2", "2026-11-27T04:00:00Z", None, "test", [5, 7])))
        kite = conn.execute("SELECT tokens FROM feed_gaps WHERE connection = 'kite-0'"
                            ).fetchone()[0]
    assert len(want) == len(keys) and got == want
    assert kite == [5, 7]
