"""The Kite-protocol simulator server: handshake, requests, data, postbacks, recording, faults, CLI.

Real sockets over loopback with a plain ``websockets`` client; what arrives is
decoded with the project's decoder.  A bad request is used as a fence: the
server's error reply comes after the effect of every earlier request, so the
messages after it must reflect them exactly.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from websockets.asyncio.client import connect as _connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from conftest import VECTORS
from ingestor import KiteDecoder, decode_kite
from ingestor.feed.capture import CaptureReader
from ingestor.sim.server import (MAX_TOKENS_PER_CONNECTION, Faults, OrderPostbacks, SimServer,
                                ThreadedSimServer, damage)
from ingestor.sim.market import HEARTBEAT, Market

QUOTE_LEN = {False: 44, True: 28}   # by is_index
FULL_LEN = {False: 184, True: 32}


def connect(url, **kw):
    """A plain client; unbounded queue, so a test that stops reading still closes at once."""
    return _connect(url, max_queue=None, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _until(cond, timeout: float = 10.0) -> None:
    """Wait for the server to reach a state (polling; fails after ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "the server never got there"
        await asyncio.sleep(0.01)


def _req(action, value) -> str:
    return json.dumps({"a": action, "v": value})


async def _fence(ws) -> list:
    """Send a bad request; return the messages received before its error reply."""
    await ws.send(_req("fence", None))
    before = []
    while True:
        m = await ws.recv()
        if isinstance(m, str) and json.loads(m) == {"type": "error",
                                                   "data": "unknown action 'fence'"}:
            return before
        before.append(m)


async def _data(ws, n: int) -> list[bytes]:
    """The next ``n`` data messages (heartbeats and texts skipped)."""
    out = []
    while len(out) < n:
        m = await ws.recv()
        if isinstance(m, bytes) and m != HEARTBEAT:
            out.append(m)
    return out


def _packets(messages) -> list[tuple[int, int]]:
    """(token, packet length) of every packet of the messages."""
    out = []
    for m in messages:
        rec = decode_kite(m)
        out += list(zip(rec["instrument_token"].tolist(), rec["length"].tolist()))
    return out


def _universe_sample(srv: SimServer, n: int):
    """``n`` tokens including an index instrument (their packets differ in length)."""
    inst = srv.market.instruments
    index = [i.instrument_token for i in inst if i.is_index]
    other = [i.instrument_token for i in inst if not i.is_index]
    assert index, "the universe has an index instrument"
    return index[:1] + other[:n - 1]


# ------------------------------------------------------------------ handshake

def test_handshake_needs_api_key_and_access_token():
    async def main():
        async with SimServer(tokens=10, rate=0) as srv:
            for query in ("", "/?api_key=k", "/?access_token=t", "/?api_key=&access_token=t"):
                with pytest.raises(InvalidStatus) as e:
                    async with connect(srv.url + query):
                        pass
                assert e.value.response.status_code == 403
            async with connect(srv.client_url("k", "t")) as ws:
                assert ws.response.status_code == 101
            assert srv.stats["rejected_403"] == 4
            assert srv.stats["connections"] == 1
    run(main())


def test_reject_token_and_expected_token():
    async def main():
        async with SimServer(tokens=10, rate=0, faults=Faults(reject_token=True)) as srv:
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.client_url("k", "t")):
                    pass
            assert e.value.response.status_code == 403
            assert srv.stats["connections"] == 0
        async with SimServer(tokens=10, rate=0, expected_token="good") as srv:
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.client_url("k", "bad")):
                    pass
            assert e.value.response.status_code == 403
            async with connect(srv.client_url("k", "good")):
                pass
    run(main())


def test_connections_are_counted_and_limited_per_api_key():
    async def main():
        async with SimServer(tokens=10, rate=0, max_connections=2) as srv:
            async with connect(srv.client_url("k", "t")), connect(srv.client_url("k", "t")):
                assert srv.connections == 2
                with pytest.raises(InvalidStatus) as e:
                    async with connect(srv.client_url("k", "t")):
                        pass
                assert e.value.response.status_code == 429
                async with connect(srv.client_url("other", "t")):  # another key
                    assert srv.connections == 3
            await _until(lambda: srv.connections == 0)
            assert srv.stats["rejected_429"] == 1
    run(main())


# ------------------------------------------------------------------ requests

def test_subscribe_mode_unsubscribe_change_what_arrives():
    async def main():
        async with SimServer(tokens=60, rate=5000, seed=3) as srv:
            idx_of = {i.instrument_token: i.is_index for i in srv.market.instruments}
            tokens = _universe_sample(srv, 12)
            async with connect(srv.client_url()) as ws:
                await ws.send(_req("subscribe", tokens))          # default mode: quote
                await _fence(ws)
                pk = _packets(await _data(ws, 20))
                assert {t for t, _ in pk} <= set(tokens)
                assert len({t for t, _ in pk}) > 1
                assert all(n == QUOTE_LEN[idx_of[t]] for t, n in pk)

                full, ltp = tokens[:4], tokens[4:8]                # full includes the index
                await ws.send(_req("mode", ["full", full]))
                await ws.send(_req("mode", ["ltp", ltp]))
                await ws.send(_req("mode", ["full", [tokens[0] + (1 << 30)]]))  # not subscribed
                await _fence(ws)
                pk = _packets(await _data(ws, 40))
                want = {t: (FULL_LEN[idx_of[t]] if t in full else 8 if t in ltp
                            else QUOTE_LEN[idx_of[t]]) for t in tokens}
                assert all(n == want[t] for t, n in pk)
                assert {n for _, n in pk} == {8, 28, 32, 44, 184} & set(want.values())

                await ws.send(_req("unsubscribe", tokens[2:]))
                await _fence(ws)
                pk = _packets(await _data(ws, 10))
                assert {t for t, _ in pk} <= set(tokens[:2])
                assert all(n == want[t] for t, n in pk)
                await ws.send(_req("subscribe", full[:2]))          # back to quote
                await _fence(ws)
                assert all(n == QUOTE_LEN[idx_of[t]] for t, n in _packets(await _data(ws, 10)))
    run(main())


def test_bad_requests_and_the_token_limit_get_error_texts():
    async def main():
        async with SimServer(tokens=20, rate=0) as srv:
            async with connect(srv.client_url()) as ws:
                errors = []
                for bad in ("not json", "[1]", _req("subscribe", ["x"]),
                            _req("subscribe", [-1]), _req("mode", ["fast", [1]]), b"\x01"):
                    await ws.send(bad)
                    errors.append(json.loads(await ws.recv()))
                assert all(e["type"] == "error" and e["data"] for e in errors)
                # Tokens outside the universe count against the limit too.
                await ws.send(_req("subscribe", list(range(1, MAX_TOKENS_PER_CONNECTION + 6))))
                e = json.loads(await ws.recv())
                assert e["type"] == "error" and "5 token(s) not subscribed" in e["data"]
                assert srv.stats["subscribed"] == MAX_TOKENS_PER_CONNECTION
                await ws.send(_req("unsubscribe", [1, 2]))
                await ws.send(_req("subscribe", [7000, 7001, 7002]))
                e = json.loads(await ws.recv())
                assert "1 token(s) not subscribed" in e["data"]
    run(main())


def test_heartbeats_when_idle():
    async def main():
        async with SimServer(tokens=10, rate=1000, heartbeat_interval=0.05) as srv:
            async with connect(srv.client_url()) as ws:
                assert [await ws.recv() for _ in range(3)] == [HEARTBEAT] * 3
                # Subscribed only to tokens outside the universe: still nothing to send.
                await ws.send(_req("subscribe", [1 << 20 | 1, 5]))
                await _fence(ws)
                assert [await ws.recv() for _ in range(3)] == [HEARTBEAT] * 3
            assert srv.stats["ticks"] == 0 and srv.stats["heartbeats"] >= 6
    run(main())


# ------------------------------------------------------------------ postbacks

def test_postbacks_arrive_as_text_with_the_official_keys():
    with open(os.path.join(VECTORS, "postback.json")) as f:
        official = json.load(f)

    from ingestor.sim.server import OrderPostbacks
    from ingestor.sim.market import Market

    market = Market(n_tokens=30, seed=5)

    async def main():
        async with SimServer(market=market, rate=0, seed=5, postbacks=200,
                             postback_source=OrderPostbacks(market.instruments, 5)) as srv:
            universe = {i.instrument_token: i for i in srv.market.instruments}
            async with connect(srv.client_url()) as ws:
                texts = []
                while len(texts) < 30:
                    m = await ws.recv()
                    if isinstance(m, str):
                        texts.append(json.loads(m))
                    else:
                        assert m == HEARTBEAT
        statuses = set()
        for t in texts:
            assert t["type"] == "order"
            d = t["data"]
            assert list(d) == list(official)
            for k, v in official.items():
                if v is not None:
                    assert type(d[k]) is type(v) or {type(d[k]), type(v)} <= {int, float}, k
            inst = universe[d["instrument_token"]]
            assert (d["exchange"], d["tradingsymbol"]) == (inst.exchange, inst.tradingsymbol)
            assert d["checksum"] == hashlib.sha256(
                (d["order_id"] + d["order_timestamp"] + "simulator-secret").encode()).hexdigest()
            assert d["filled_quantity"] + d["pending_quantity"] + d["cancelled_quantity"] \
                <= d["quantity"]
            statuses.add(d["status"])
        assert "OPEN" in statuses and len(statuses) > 1
    run(main())


def test_postback_source_is_pluggable_and_goes_to_the_first_connection():
    sent = []

    def source(n):
        out = [json.dumps({"type": "order", "data": {"n": len(sent) + i}}) for i in range(n)]
        sent.extend(out)
        return out

    async def main():
        async with SimServer(tokens=5, rate=0, postbacks=100, postback_source=source) as srv:
            async with connect(srv.client_url()) as first, connect(srv.client_url()) as second:
                got = []
                while len(got) < 10:
                    m = await first.recv()
                    if isinstance(m, str):
                        got.append(m)
                assert got == sent[:10]
                await second.send(_req("fence", None))
                assert json.loads(await second.recv())["type"] == "error"  # no order first
    run(main())


def test_builtin_postbacks_are_deterministic_per_seed():
    inst = Market(n_tokens=20, seed=1).instruments
    a, b = OrderPostbacks(inst, seed=9), OrderPostbacks(inst, seed=9)
    strip = ("order_timestamp", "exchange_update_timestamp", "exchange_timestamp", "checksum",
             "order_id")

    def keyed(texts):
        return [{k: v for k, v in json.loads(t)["data"].items() if k not in strip}
                for t in texts]

    assert keyed(a(25)) == keyed(b(25))


# ------------------------------------------------------------------ recording

def _recorded(path):
    with CaptureReader(path) as r:
        return [(rec.kind, rec.payload) for rec in r.records()], r.header


def test_recording_equals_what_the_client_received(tmp_path):
    cap = tmp_path / "sent.cap"

    async def main():
        srv = SimServer(tokens=50, rate=20000, seed=2, record=cap, postbacks=50,
                        heartbeat_interval=0.02, faults=Faults(malformed=0.05), stream="s1")
        await srv.start()
        received = []
        async with connect(srv.client_url()) as ws:
            tokens = [int(t) for t in srv.market.tokens]
            await ws.send(_req("subscribe", tokens[:30]))
            await ws.send(_req("mode", ["full", tokens[:10]]))
            await ws.send(_req("mode", ["ltp", tokens[10:20]]))
            while len(received) < 400:
                received.append(await ws.recv())
            await ws.send(_req("unsubscribe", tokens))      # idle: heartbeats
            while sum(m == HEARTBEAT for m in received[400:]) < 3:
                received.append(await ws.recv())
            closer = asyncio.ensure_future(srv.close())
            try:
                while True:
                    received.append(await ws.recv())
            except ConnectionClosed as exc:
                assert exc.rcvd.code == 1001                 # going away, gracefully
            await closer
        return received, srv.stats

    received, stats = run(main())
    records, header = _recorded(cap)
    assert header.stream == "s1"
    want = [(2, m.encode()) if isinstance(m, str) else (1, m) for m in received]
    assert records == want
    assert stats["messages"] == len(records)
    kinds = {k for k, _ in records}
    assert kinds == {1, 2}
    # the counters are exactly what the recording holds
    binary = [p for k, p in records if k == 1]
    assert stats["heartbeats"] == sum(p == HEARTBEAT for p in binary) >= 3
    assert stats["postbacks"] == sum(k == 2 and json.loads(p)["type"] == "order"
                                     for k, p in records) > 0
    dec = KiteDecoder()
    for p in binary:
        dec.feed(p)
    assert stats["malformed"] == dec.stats()["malformed_messages"] > 0


def test_killed_server_leaves_a_usable_capture(tmp_path):
    """Flushed regularly: read while the server still runs, whole records only."""
    cap = tmp_path / "live.cap"

    async def main():
        async with SimServer(tokens=20, rate=5000, record=cap, flush_interval=0.02) as srv:
            async with connect(srv.client_url()) as ws:
                await ws.send(_req("subscribe", [int(t) for t in srv.market.tokens]))
                got = await _data(ws, 30)

                def data():                                  # the file as a crash would leave it
                    return [p for k, p in _recorded(cap)[0] if k == 1 and p != HEARTBEAT]

                # flushed every 20 ms: wait for it (a deadline, the machine may be busy)
                await _until(lambda: len(data()) >= 30)
                assert data()[:30] == got
    run(main())


# ------------------------------------------------------------------ faults

def test_drop_every_aborts_without_a_close_frame_after_sending_what_was_recorded(tmp_path):
    cap = tmp_path / "drop.cap"

    async def main():
        async with SimServer(tokens=20, rate=20000, record=cap,
                             faults=Faults(drop_every=0.3)) as srv:
            received = []
            for _ in range(2):                               # and again after reconnecting
                async with connect(srv.client_url()) as ws:
                    await ws.send(_req("subscribe", [int(t) for t in srv.market.tokens]))
                    with pytest.raises(ConnectionClosedError) as e:
                        while True:
                            received.append(await ws.recv())
                    assert e.value.rcvd is None              # no close frame
            await _until(lambda: srv.connections == 0)
            assert srv.stats["drops"] == 2
        return received

    received = run(main())
    records, _ = _recorded(cap)
    assert [p for _, p in records] == received
    assert len(received) > 10


def test_stall_stops_everything_without_closing_then_resumes(tmp_path):
    cap = tmp_path / "stall.cap"

    async def main():
        async with SimServer(tokens=20, rate=5000, heartbeat_interval=0.02, record=cap,
                             faults=Faults(stall_after=0.3, stall_for=3.0)) as srv:
            async with connect(srv.client_url(), ping_interval=None) as ws:
                await ws.send(_req("subscribe", [int(t) for t in srv.market.tokens[:5]]))
                n = 0
                while True:                                  # traffic until the stall
                    try:
                        await asyncio.wait_for(ws.recv(), 0.2)
                        n += 1
                    except asyncio.TimeoutError:
                        if srv.stats["stalls"]:
                            break
                assert n > 20 and srv.stats["stalls"] == 1
                sent = srv.stats["messages"]
                pong = await ws.ping()                       # unanswered while stalled
                await asyncio.sleep(0.3)
                assert not pong.done()
                assert srv.stats["messages"] == sent        # not even heartbeats
                assert srv.connections == 1                  # still open
                await asyncio.wait_for(pong, 5)              # resumed: read again
                assert len(await _data(ws, 5)) == 5          # and sending again
    run(main())


def test_malformed_fraction_is_counted_by_the_decoder():
    async def main():
        async with SimServer(tokens=40, rate=20000, seed=4,
                             faults=Faults(malformed=0.3)) as srv:
            dec = KiteDecoder(1 << 16)
            async with connect(srv.client_url()) as ws:
                await ws.send(_req("subscribe", [int(t) for t in srv.market.tokens]))
                await ws.send(_req("mode", ["full", [int(t) for t in srv.market.tokens[:20]]]))
                for m in await _data(ws, 300):
                    assert dec.feed(m)
                    dec.clear()
                await ws.send(_req("unsubscribe", [int(t) for t in srv.market.tokens]))
                for m in await _fence(ws):
                    if isinstance(m, bytes):
                        assert dec.feed(m)
                        dec.clear()
                stats = srv.stats
        return dec.stats(), stats

    dstats, sstats = run(main())
    assert dstats["malformed_messages"] == sstats["malformed"]
    assert 30 < sstats["malformed"] < 200
    intact = dstats["messages"] - dstats["heartbeats"] - dstats["malformed_messages"]
    assert intact + sstats["malformed"] == sstats["binary_messages"] - sstats["heartbeats"]


def test_every_kind_of_damage_is_malformed_for_the_decoder(rng):
    rng = np.random.default_rng(rng.getrandbits(64))
    m = Market(n_tokens=30, seed=int(rng.integers(1 << 30)))
    kinds = set()
    for _ in range(400):
        k = int(rng.integers(1, 30))
        subs = {int(t): str(rng.choice(["ltp", "quote", "full"])) for t in m.tokens[:k]}
        msg = m.message(subs)
        bad, kind = damage(msg, rng)
        kinds.add(kind)
        dec = KiteDecoder(64)
        dec.feed(bad)
        assert dec.stats()["malformed_messages"] == 1, (kind, msg.hex(), bad.hex())
    assert kinds == {"truncated", "bad_length", "trailing", "garbage"}


def test_rate_is_shared_between_connections_by_subscriptions():
    async def main():
        async with SimServer(tokens=40, rate=20000, seed=6) as srv:
            tokens = [int(t) for t in srv.market.tokens]
            async with connect(srv.client_url()) as a, connect(srv.client_url()) as b:
                await a.send(_req("subscribe", tokens[:30]))
                await b.send(_req("subscribe", tokens[30:40]))
                pa = _packets(await _data(a, 60))
                pb = _packets(await _data(b, 20))
                assert {t for t, _ in pa} <= set(tokens[:30])
                assert {t for t, _ in pb} <= set(tokens[30:40])
    run(main())


def test_threaded_server():
    with ThreadedSimServer(tokens=10, rate=2000) as srv:
        async def main():
            async with connect(srv.client_url()) as ws:
                await ws.send(_req("subscribe", [int(t) for t in srv.server.market.tokens]))
                return await _data(ws, 3)
        assert len(run(main())) == 3
    assert srv.server.sent_ticks > 0


# ------------------------------------------------------------------ CLI

def _env() -> dict:
    """The environment with this ``ingestor`` importable from any directory."""
    import ingestor

    src = os.path.dirname(os.path.dirname(os.path.abspath(ingestor.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=src + (os.pathsep + path if path else ""))


def _start_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "ingestor", "simulate", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_writes_the_csv_prints_its_address_and_exits_0_after_duration(tmp_path):
    cap, inst = tmp_path / "rec.cap", tmp_path / "inst.csv"
    p = _start_cli("--listen", "127.0.0.1:0", "--tokens", "25", "--rate", "3000",
                   "--duration", "2", "--record", str(cap), "--instruments-csv", str(inst),
                   "--postbacks", "5")
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on ws://127.0.0.1:"), line
        url = line.split()[-1]
        assert int(url.rsplit(":", 1)[1]) > 0
        with open(inst) as f:                                # written before listening
            rows = list(csv.reader(f))
        assert rows[0][0] == "instrument_token" and len(rows) == 26
        tokens = [int(r[0]) for r in rows[1:]]

        async def main():
            received = []
            async with connect(url + "/?api_key=k&access_token=t") as ws:
                await ws.send(_req("subscribe", tokens))
                try:
                    while True:
                        received.append(await ws.recv())
                except ConnectionClosed as exc:
                    assert exc.rcvd.code == 1001
            return received

        received = run(main())
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "simulate: served" in out
    records, _ = _recorded(cap)
    assert [p for _, p in records] == [m.encode() if isinstance(m, str) else m for m in received]
    assert {t for t, _ in _packets(m for m in received if isinstance(m, bytes))} <= set(tokens)


def test_cli_exits_0_on_sigterm_and_defaults_the_csv_next_to_the_record(tmp_path):
    cap = tmp_path / "rec.cap"
    p = _start_cli("--listen", "127.0.0.1:0", "--tokens", "5", "--record", str(cap))
    try:
        assert p.stdout.readline().startswith("listening on ws://")
        assert (tmp_path / "rec.instruments.csv").exists()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert _recorded(cap)[0] == []


@pytest.mark.parametrize("args", [
    ["--listen", "nowhere"],
    ["--listen", "127.0.0.1:0", "--out", "x.cap", "--ticks", "5"],
    ["--listen", "127.0.0.1:0", "--malformed", "2"],
    ["--listen", "127.0.0.1:0", "--stall-for", "1"],
    ["--listen", "127.0.0.1:0", "--postback-source", "nomodule"],
])
def test_cli_usage_errors_exit_2(args, tmp_path):
    p = subprocess.run([sys.executable, "-m", "ingestor", "simulate", *args], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "simulate" in p.stderr


def test_default_postbacks_are_order_lifecycles_the_store_decodes():
    from ingestor.orders.postback import decode_postback

    with open(os.path.join(VECTORS, "postback.json")) as f:
        official = json.load(f)

    async def main():
        async with SimServer(tokens=30, rate=0, seed=6, postbacks=300) as srv:
            async with connect(srv.client_url()) as ws:
                texts = []
                while len(texts) < 60:
                    m = await ws.recv()
                    if isinstance(m, str):
                        texts.append(m)
        return texts

    texts = asyncio.run(main())
    statuses = set()
    for t in texts:
        d = json.loads(t)["data"]
        assert set(official) <= set(d)
        pb = decode_postback(t)
        statuses.add(pb.status)
    assert "OPEN" in statuses and len(statuses) > 1
