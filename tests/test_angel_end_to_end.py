"""End to end: the Angel One simulator -> the SmartStream client -> a capture (broker angel)
-> the shared driver, pipeline and writer (only the decoder is SmartStream's) -> PostgreSQL:
every tick once, at its exact price, in its exchange; candles and snapshots from the same
engine; a second pass over the same capture writes nothing (the stream's offset)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from decimal import Decimal

import psycopg

from ingestor.feed.capture import CaptureHeader, CaptureReader, CaptureWriter
from ingestor.feed.smartstream import SmartStreamFeed
from ingestor.pipeline.driver import Driver, drive_capture
from ingestor.pipeline.pipeline import Pipeline
from ingestor.pipeline.replay import write_batches
from ingestor.pipeline.state import load_state
from ingestor.sim.smartstream import AngelMarket, AngelSimServer
from ingestor.store import instruments as ins
from ingestor.store.writer import Writer
from ingestor.twin.smartstream import LENGTHS, SEGMENTS, parse_packet


async def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _record(tmp_path, market: AngelMarket, subs, n_packets: int):
    """Run the client against the simulator until ``n_packets`` arrived; a capture of them."""
    path = tmp_path / "angel.cap"

    async def main():
        async with AngelSimServer(market=market, rate=2000, feed_token="ft") as sim:
            writer = None
            got = []

            def on_connect(stream):
                nonlocal writer
                writer = CaptureWriter(path, CaptureHeader(broker="angel", stream=stream))

            def on_message(stream, payload, is_text, recv_ns):
                if len(got) < n_packets:
                    writer.write(payload, 1, recv_ns)
                    got.append(payload)

            feed = SmartStreamFeed("angel-0", sim.url, "key", "C1", "jwt", "ft", subs,
                                   on_message=on_message, on_connect=on_connect,
                                   heartbeat_timeout=5, ping_interval=0.2)
            stop = asyncio.Event()
            task = asyncio.create_task(feed.run(stop))
            await _until(lambda: len(got) >= n_packets)
            stop.set()
            await feed.close()
            await asyncio.wait_for(task, 5)
            writer.close()
            return got

    return path, asyncio.run(main())


def _ingest(path, dsn) -> Pipeline:
    """The capture through the shared driver, pipeline and writer, with the registry's
    SmartStream decoder in place of the Kite one."""
    from ingestor.store.offsets import committed

    reader = CaptureReader(path)
    assert reader.header.broker == "angel"
    setup = psycopg.connect(dsn, autocommit=True)
    try:
        stream = reader.header.stream
        pl = Pipeline(stream, resolve=lambda keys: ins.register_tokens(setup, keys,
                                                                      broker="angel"),
                      committed=committed(setup, stream))
        pl.decoder = ins.angel_decoder(setup)
        load_state(setup, pl)

        async def run():
            queue: asyncio.Queue = asyncio.Queue(maxsize=2)
            writer = Writer(dsn)
            await writer.connect()
            try:
                w = asyncio.create_task(write_batches(queue, writer))
                await drive_capture(Driver(pl, queue), reader, pl.committed)
                await queue.put(None)
                await w
            finally:
                await writer.close()

        asyncio.run(run())
    finally:
        reader.close()
        setup.close()
    return pl


def test_simulator_to_database_every_tick_once(db, tmp_path):
    market = AngelMarket(60, seed=11)
    keys = list(market.keys)
    modes = ("ltp", "quote", "snap_quote", "depth")
    subs = {k: modes[i % 4] if modes[i % 4] != "depth" or k[0] == 1 else "quote"
            for i, k in enumerate(keys[:24])}
    # the master names all but 12 subscribed tokens: those are registered when first met
    master = tmp_path / "OpenAPIScripMaster.json"
    market.write_master(master)
    read = ins.read_angel(master)
    with psycopg.connect(db) as conn:
        unnamed = set(keys[:12])
        ins.load_angel(conn, [r for r in read.rows if (r.exchange_type, r.token) not in unnamed])

    path, sent = _record(tmp_path, market, subs, 1500)
    pl = _ingest(path, db)

    ticks = [parse_packet(p) for p in sent if p[0] != 4]
    depth = [p for p in sent if p[0] == 4]
    assert len(ticks) + len(depth) == len(sent) and ticks and depth
    assert all(len(p) == LENGTHS[p[0]] for p in sent)
    assert pl.decoder.stats()["malformed_messages"] == 0
    assert pl.decoder.stats()["depth"] == len(depth)
    assert pl.totals["depth20"] == len(depth)
    with psycopg.connect(db) as conn:
        key_of = {(e, t): k for e, t, k in ins.angel_keys(conn)}
        id_of = dict(conn.execute("SELECT instrument_token, id FROM instruments "
                                  "WHERE broker = 'angel'").fetchall())
        rows = conn.execute("SELECT instrument_id, price, exchange FROM tick_data").fetchall()
        n_snap = conn.execute("SELECT count(*) FROM order_book_snapshots").fetchone()[0]
        n_candles = conn.execute("SELECT count(*) FROM ohlc_candles").fetchone()[0]
        placeholders = conn.execute("SELECT count(*) FROM instruments WHERE broker = 'angel' "
                                    "AND symbol LIKE 'TOKEN:%'").fetchone()[0]
    from ingestor.store.instruments import EXCHANGES

    want = Counter()
    for p in ticks:
        et = p["exchange_type"]
        div = 10**7 if et == 13 else 100
        want[(id_of[key_of[et, p["token"]]], Decimal(p["last_traded_price"]) / div,
              EXCHANGES[SEGMENTS[et]])] += 1
    got = Counter((i, price, exch) for i, price, exch in rows)
    assert got == want                       # every tick once, exact price, its exchange
    assert n_snap > 0 and n_candles > 0
    assert placeholders > 0                  # tokens the master lacked were registered

    # the same capture again: its offset is committed, nothing is written twice
    _ingest(path, db)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM tick_data").fetchone()[0] == len(rows)
        # DEPTH packets: one order_book_depth20 row each, exactly once over both passes
        assert conn.execute("SELECT count(*) FROM order_book_depth20").fetchone()[0] == len(depth)
