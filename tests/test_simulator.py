"""The market simulator: deterministic, realistic enough, and the CLI around it."""

from __future__ import annotations

import csv
import datetime as dt
import os

import numpy as np
import pytest

from conftest import VECTORS
from ingestor import KiteDecoder
from ingestor.feed.capture import CaptureReader
from ingestor.cli import main
from ingestor.sim.market import Market, generate_capture, make_universe

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))


def _ticks(path):
    dec = KiteDecoder(1 << 15)
    ticks, books = [], []
    nbooks = 0
    with CaptureReader(path) as r:
        for chunk, seq in r.chunks():
            pos = 0
            while True:
                pos, seq, full = dec.feed_capture(chunk, pos, seq)
                t = dec.ticks[:dec.n_ticks].copy()
                d = dec.depth[:dec.n_depth].copy()
                t["depth_row"][t["depth_row"] >= 0] += nbooks  # rows across drains
                nbooks += len(d)
                books.append(d)
                ticks.append(t)
                dec.clear()
                if not full:
                    break
    return np.concatenate(ticks), np.concatenate(books), dec.stats()


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.cap", tmp_path / "b.cap", tmp_path / "c.cap"
    ra = generate_capture(a, 5000, tokens=30, mode="mixed", seed=11)
    generate_capture(b, 5000, tokens=30, mode="mixed", seed=11)
    generate_capture(c, 5000, tokens=30, mode="mixed", seed=12)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert ra["packets"] == 5000 and ra["bytes"] == a.stat().st_size


@pytest.mark.parametrize("tokens,ticks", [(3, 9), (12, 400), (60, 2_000), (300, 5_000)])
@pytest.mark.parametrize("seed", range(12))
def test_mixed_capture_covers_every_segment_in_every_mode(tmp_path, seed, tokens, ticks):
    # whatever the seed, down to 3 * tokens ticks: tests of the decoder rely on it
    path = tmp_path / "m.cap"
    generate_capture(path, ticks, tokens=tokens, mode="mixed", seed=seed)
    t, _, st = _ticks(path)
    segments = {int(x) & 0xFF for x in t["instrument_token"]}
    got = {(int(x) & 0xFF, int(n)) for x, n in zip(t["instrument_token"], t["length"])}
    assert got == {(s, n) for s in segments for n in ((8, 28, 32) if s == 9 else (8, 44, 184))}
    assert st["packets"] == ticks
    # and every instrument appears in every mode
    per_token = {}
    for x, n in zip(t["instrument_token"].tolist(), t["length"].tolist()):
        per_token.setdefault(x, set()).add(n)
    assert len(per_token) == tokens and all(len(v) == 3 for v in per_token.values())


def test_universe_tokens_and_segments():
    uni = make_universe(200, seed=3)
    tokens = [i.instrument_token for i in uni]
    assert len(set(tokens)) == 200
    assert len({(i.exchange, i.tradingsymbol) for i in uni}) == 200
    assert {i.segment_code for i in uni} == {1, 2, 3, 4, 5, 6, 7, 8, 9, 12}
    for i in uni:
        assert i.instrument_token == (i.exchange_token << 8) | i.segment_code
        assert i.divisor == {3: 10_000_000, 6: 10_000, 12: 10_000}.get(i.segment_code, 100)
        assert i.price % i.tick == 0 and i.price > 0
    # Small universes still start with the main segments.
    assert [i.segment_code for i in make_universe(3, seed=1)] == [1, 2, 9]


def test_capture_is_realistic(tmp_path):
    path = tmp_path / "full.cap"
    market = Market(n_tokens=50, seed=4)
    r = generate_capture(path, 40_000, mode="full", seed=4, market=market,
                         session_reset_probability=0.0)
    t, d, st = _ticks(path)
    assert st["malformed_messages"] == 0 and st["heartbeats"] == r["heartbeats"] > 0
    assert st["packets"] == 40_000 and st["messages"] == r["messages"]
    tick = {int(x): int(y) for x, y in zip(market.tokens, market.tick)}
    ticks = np.array([tick[int(x)] for x in t["instrument_token"]])
    # Prices on each instrument's tick grid.
    for f in ("last_price", "open", "high", "low", "close"):
        assert (t[f] % ticks == 0).all(), f
    assert (t["low"] <= t["last_price"]).all() and (t["last_price"] <= t["high"]).all()
    # Books: best bid below best ask, levels ordered away from the touch,
    # empty levels all zero, the last trade between the touches.
    full = t[t["length"] == 184]
    bk = d[full["depth_row"]]
    both = (bk["bid_quantity"][:, 0] > 0) & (bk["ask_quantity"][:, 0] > 0)
    assert both.mean() > 0.8
    assert (bk["bid_price"][both, 0] < bk["ask_price"][both, 0]).all()
    assert (bk["bid_price"][both, 0] <= full["last_price"][both]).all()
    assert (full["last_price"][both] <= bk["ask_price"][both, 0]).all()
    for side, sign in (("bid", -1), ("ask", 1)):
        q, p, o = bk[side + "_quantity"], bk[side + "_price"].astype(np.int64), bk[side + "_orders"]
        empty = q == 0
        assert (p[empty] == 0).all() and (o[empty] == 0).all()
        assert empty.any()  # thin books happen
        ok = ~empty[:, 1:] & ~empty[:, :-1]
        assert (np.sign(np.diff(p, axis=1))[ok] == sign).all()
    # Cumulative volume and day OI range never go back within a session.
    for tok in np.unique(t["instrument_token"]):
        s = t[t["instrument_token"] == tok]
        s = s[s["length"] == 184]
        assert (np.diff(s["volume_traded"].astype(np.int64)) >= 0).all()
        assert (s["oi_day_low"] <= s["oi"]).all() and (s["oi"] <= s["oi_day_high"]).all()
        assert (np.diff(s["exchange_timestamp"].astype(np.int64)) >= 0).all()
        assert (s["last_trade_time"] <= s["exchange_timestamp"]).all()
    # Receive times inside an Indian trading session.
    for ns in (int(t["recv_ns"].min()), int(t["recv_ns"].max())):
        local = dt.datetime.fromtimestamp(ns / 1e9, IST)
        assert local.weekday() < 5 and dt.time(9, 15) <= local.time() <= dt.time(15, 30)
    assert (np.diff(t["recv_ns"].astype(np.int64)) >= 0).all()


def test_new_session_resets_day_fields(tmp_path):
    path = tmp_path / "s.cap"
    r = generate_capture(path, 20_000, tokens=5, mode="quote", seed=2,
                         session_reset_probability=0.05)
    assert r["sessions"] > 1
    t, _, _ = _ticks(path)
    tok = t[t["instrument_token"] == t["instrument_token"][0]]
    vol = tok["volume_traded"].astype(np.int64)
    assert (np.diff(vol) < 0).any()  # the volume went back to a new day's count


def test_instruments_csv_layout(tmp_path):
    with open(os.path.join(VECTORS, "instruments_all.csv"), newline="") as f:
        header = next(csv.reader(f))
    path = tmp_path / "i.csv"
    market = Market(n_tokens=40, seed=9)
    market.write_instruments_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == header
    assert len(rows) == 41
    by_token = {int(r[0]): dict(zip(header, r)) for r in rows[1:]}
    for inst in market.instruments:
        r = by_token[inst.instrument_token]
        assert int(r["exchange_token"]) == inst.exchange_token
        assert r["exchange"] == inst.exchange and r["tradingsymbol"] == inst.tradingsymbol
        if inst.segment_code == 9:
            assert r["segment"] == "INDICES"
        else:
            assert r["segment"].split("-")[0] == r["exchange"]
            # tick size and prices exactly raw / divisor
            assert round(float(r["tick_size"]) * inst.divisor) == inst.tick
        assert round(float(r["last_price"]) * inst.divisor) == inst.price
        assert r["expiry"] == "" or dt.date.fromisoformat(r["expiry"])


def test_simulate_command(tmp_path, capsys):
    out, inst = tmp_path / "x.cap", tmp_path / "x.csv"
    assert main(["simulate", "--out", str(out), "--ticks", "3000", "--tokens", "12",
                 "--mode", "full", "--seed", "5", "--instruments-csv", str(inst)]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "3000 ticks" in line
    _, _, st = _ticks(out)
    assert st["packets"] == 3000 and st["ltp"] == st["quote"] == st["index_quote"] == 0
    assert len(inst.read_text().splitlines()) == 13


@pytest.mark.parametrize("argv", [
    ["simulate", "--ticks", "5"],
    ["simulate", "--out", "x.cap"],
    ["simulate", "--out", "x.cap", "--ticks", "-1"],
    ["simulate", "--out", "x.cap", "--ticks", "5", "--tokens", "0"],
    ["simulate", "--out", "x.cap", "--ticks", "5", "--mode", "depth"],
    ["simulate", "--out", "x.cap", "--ticks", "many"],
    ["simulate", "--out", "/nonexistent-dir/x.cap", "--ticks", "5"],
])
def test_simulate_bad_usage(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ingestor: error:") and err.count("\n") == 1
