"""The pieces of ``ingestor run`` for Angel One feeds, one at a time: the ``[[feeds]]`` entry
(exchange:token, the broker's modes and limits), its four credentials, the feed plan and the
subscriptions kept beside the spool, the registry resolver retried while the database is
away, and the pipeline's ``order_book_depth20`` rows (exact, exactly once)."""

from __future__ import annotations

import asyncio
import logging
import threading

import msgspec
import psycopg
import pytest

from ingestor import config as config_mod
from pg_private import private_pg, private_pg_running  # noqa: F401 - fixtures

ANGEL = {"ANGEL_API_KEY": "akey-secret", "ANGEL_CLIENT_CODE": "C99",
         "ANGEL_JWT": "jwt-secret-1", "ANGEL_FEED_TOKEN": "feed-secret-1"}


def _cfg(text: str) -> config_mod.Config:
    cfg = msgspec.toml.decode(text.encode(), type=config_mod.Config)
    config_mod.validate(cfg)
    return cfg


def _bad(text: str) -> str:
    with pytest.raises(config_mod.ConfigError) as exc:
        _cfg(text)
    return str(exc.value)


def test_angel_feed_entry_is_checked():
    cfg = _cfg('[[feeds]]\nbroker = "angel"\ntokens = ["nse_cm:3045", "2:35003", "cde_fo:1"]\n'
               'modes = { "nse_cm:3045" = "depth", "2:35003" = "ltp" }\n')
    f = cfg.feeds[0]
    assert (f.name, f.url) == ("angel", config_mod.ANGEL_URL)
    assert f.heartbeat_timeout > f.ping_interval           # a quiet market only pongs
    assert config_mod.per_connection(f) == 1000            # the default 3000 is Kite's
    assert [config_mod.angel_key(t) for t in f.tokens] == [(1, "3045"), (2, "35003"),
                                                           (13, "1")]
    assert "exchange:token" in _bad('[[feeds]]\nbroker = "angel"\ntokens = [3045]\n')
    assert "not one of" in _bad('[[feeds]]\nbroker = "angel"\ntokens = ["nyse:1"]\n')
    assert "printable" in _bad('[[feeds]]\nbroker = "angel"\ntokens = ["1:a b"]\n')
    assert "listed twice" in _bad('[[feeds]]\nbroker = "angel"\n'
                                  'tokens = ["1:3045", "nse_cm:3045"]\n')
    assert "nse_cm" in _bad('[[feeds]]\nbroker = "angel"\ntokens = ["2:1"]\n'
                            'modes = { "2:1" = "depth" }\n')
    assert "not a kite mode" in _bad('[[feeds]]\nmode = "depth"\n')
    assert "ping_interval" in _bad('[[feeds]]\nbroker = "angel"\nheartbeat_timeout = 20.0\n')
    assert "Angel One's" in _bad('[[feeds]]\nfeed_token_env = "X"\n')
    # several feeds: each names its credentials; the same variable twice is refused
    two = ('[[feeds]]\nname = "k"\ncredentials_file = "k.env"\n[[feeds]]\nname = "a"\n'
           'broker = "angel"\n')
    assert "client_code_env" in _bad(two)
    assert "go together" in _bad(two + 'api_key_env = "A"\naccess_token_env = "B"\n')
    _cfg(two + 'api_key_env = "A"\naccess_token_env = "B"\nclient_code_env = "C"\n'
         'feed_token_env = "D"\n')


def test_angel_credentials_from_env_or_file_never_shown(tmp_path):
    from ingestor.logs import redact

    cfg = _cfg('[[feeds]]\nbroker = "angel"\n')
    assert config_mod.credentials(cfg, environ=ANGEL) == (
        "akey-secret", "C99", "jwt-secret-1", "feed-secret-1")
    assert "jwt-secret-1" not in redact("header jwt-secret-1 and feed-secret-1")
    path = tmp_path / "angel.env"
    path.write_text("api_key=k-file-1\nclient_code=C1\njwt=j-file-1\n")
    cfg = _cfg(f'[[feeds]]\nbroker = "angel"\ncredentials_file = "{path}"\n')
    with pytest.raises(config_mod.ConfigError) as exc:
        config_mod.credentials(cfg, environ={})
    assert "feed_token missing" in str(exc.value) and "j-file-1" not in str(exc.value)
    path.write_text("api_key=k-file-1\nclient_code=C1\njwt=j-file-1\nfeed_token=f-file-1\n")
    assert config_mod.credentials(cfg, environ={}) == ("k-file-1", "C1", "j-file-1",
                                                       "f-file-1")
    path.write_text("access_token=x\n")                  # Kite's key in an Angel file
    with pytest.raises(config_mod.ConfigError, match="unknown key 'access_token'"):
        config_mod.credentials(cfg, environ={})


def test_plans_and_saved_subscriptions_keep_angel_keys(tmp_path):
    from ingestor.cli import Failure
    from ingestor.commands.run import plan_tokens
    from ingestor.daemon import load_subscriptions, save_subscriptions

    cfg = _cfg('[[feeds]]\nname = "k"\ncredentials_file = "k.env"\ntokens = [256265]\n'
               '[[feeds]]\nname = "a"\nbroker = "angel"\ncredentials_file = "a.env"\n'
               'mode = "quote"\nmodes = { "1:3045" = "depth" }\n')
    kite, angel = cfg.feeds
    active = {"kite": [1, 2], "angel": [(1, "3045"), (13, "77")]}
    plan = plan_tokens(angel, active, None)
    assert plan == {(1, "3045"): "depth", (13, "77"): "quote"}
    assert plan_tokens(kite, active, None) == {256265: "full"}
    save_subscriptions(str(tmp_path), {"k": {256265: "full"}, "a": plan})
    last = load_subscriptions(str(tmp_path))
    assert last == {"k": {256265: "full"}, "a": plan}
    # the database away at start: the last run's set, of the feed's own broker only
    assert plan_tokens(angel, None, {**last["a"], 5: "full"}) == plan
    angel.modes = {"13:77": "depth"}                      # depth is nse_cm only
    with pytest.raises(Failure, match="nse_cm"):
        plan_tokens(angel, active, None)


def _daemon(tmp_path, dsn: str):
    from ingestor.daemon import Daemon
    from ingestor.feed.spool import Spool

    cfg = config_mod.Config()
    spool = Spool(str(tmp_path / "spool"), 1 << 30, 0.8, 1 << 20)
    return Daemon(cfg, dsn, [], spool)


def test_angel_registration_retried_while_the_database_is_away(tmp_path, private_pg_running,
                                                               caplog):
    """A token first met while the database is down: the decoder's resolver (the registry,
    through the daemon's retry) waits for it, as Kite's registration does, then registers it
    once with an engine key of its exchange type's segment."""
    pg = private_pg_running
    d = _daemon(tmp_path, pg.dsn())
    pg.stop("immediate")
    got: dict = {}
    caplog.set_level(logging.WARNING, "ingestor.daemon")

    def register():
        try:
            got["key"] = d._register_angel(13, "424242")
        except BaseException as exc:  # noqa: BLE001 - reported below
            got["error"] = exc

    t = threading.Thread(target=register)
    t.start()
    from daemon_harness import wait_for

    wait_for(lambda: "cannot register a new Angel One instrument yet" in caplog.text
             or not t.is_alive(), timeout=60, what="the retry said")
    assert "error" not in got, got
    assert t.is_alive()
    pg.start()
    t.join(timeout=60)
    assert not t.is_alive() and "error" not in got, got
    key = got["key"]
    assert key & 0xFF == 3                                # cde_fo: the CDS segment code
    with psycopg.connect(pg.dsn()) as conn:
        rows = conn.execute("SELECT instrument_token, symbol FROM instruments WHERE broker = "
                            "'angel' AND exchange_type = 13 AND broker_token = '424242'"
                            ).fetchall()
    assert rows == [(key, "TOKEN:424242")]
    d._resolve_conn.close()


def test_depth20_rows_exact_ordered_and_once(db):
    """DEPTH packets through the pipeline and the writer: one row each with its 20+20 levels
    exact, two packets of one instrument in the same microsecond stamped apart, a second pass
    over the same messages (the offset committed) writing none, and a new stream continuing
    after the last stored row."""
    from ingestor.pipeline.pipeline import Pipeline
    from ingestor.pipeline.state import load_state
    from ingestor.store import instruments as ins
    from ingestor.store.writer import Writer
    from ingestor.twin.smartstream import encode_depth

    bids = [(100 + i, 250_000 - 5 * i, i + 1) for i in range(20)]
    asks = [(200 + i, 250_010 + 5 * i, i + 2) for i in range(15)]      # 5 empty levels
    ms = 1_700_000_000_456
    frames = [encode_depth(1, "3045", ms, ms, bids, asks),
              encode_depth(1, "3045", 7, ms + 1, bids[::-1], asks)]      # word27: not a time
    recv = 1_700_000_001_000_000_000

    def run(stream: str, committed: int, recv_ns: int):
        with psycopg.connect(db, autocommit=True) as setup:
            pl = Pipeline(stream, resolve=lambda k: ins.register_tokens(setup, k,
                                                                         broker="angel"),
                          committed=committed)
            pl.decoder = ins.angel_decoder(setup)
            load_state(setup, pl)
            for seq, f in enumerate(frames):
                assert pl.decoder.feed(f, recv_ns, seq)   # both in one microsecond
            pl._consume()
            pl._last_seq = len(frames) - 1
            batch = pl.take(final=True)

            async def write():
                w = Writer(db)
                await w.connect()
                try:
                    return await w.write(batch)
                finally:
                    await w.close()
            return batch, asyncio.run(write())

    b, outcome = run("angel-0-a", -1, recv)
    assert b.n_depth20 == 2 and outcome == "written"
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT extract(epoch FROM time) * 1000000, bid_prices, "
                            "bid_quantities, bid_orders, ask_prices, ask_quantities, ask_orders, "
                            "extract(epoch FROM exchange_time) * 1000 FROM order_book_depth20 "
                            "ORDER BY time").fetchall()
    from decimal import Decimal

    t0 = recv // 1000
    assert [int(r[0]) for r in rows] == [t0, t0 + 1]
    first = rows[0]
    assert list(first[1]) == [Decimal(p) / 100 for _, p, _ in bids]
    assert list(first[2]) == [q for q, _, _ in bids] and list(first[3]) == [o for _, _, o in bids]
    assert list(first[4]) == [Decimal(p) / 100 for _, p, _ in asks] + [Decimal(0)] * 5
    assert list(first[5]) == [q for q, _, _ in asks] + [0] * 5
    assert list(first[6]) == [o for _, _, o in asks] + [0] * 5
    assert [int(r[7]) for r in rows] == [ms, ms + 1]        # word27 when a time, else word35
    b, _ = run("angel-0-a", 1, recv)                         # committed: nothing again
    assert b.n_depth20 == 0
    # another stream whose packets came in the same microsecond (a clock step back): after
    # the stored rows, never on them
    b, outcome = run("angel-0-b", -1, recv)
    assert b.n_depth20 == 2 and outcome == "written"
    with psycopg.connect(db) as conn:
        times = [int(r[0]) for r in conn.execute(
            "SELECT extract(epoch FROM time) * 1000000 FROM order_book_depth20 ORDER BY time")]
    assert times == [t0, t0 + 1, t0 + 2, t0 + 3]
