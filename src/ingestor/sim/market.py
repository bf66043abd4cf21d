"""A seeded, offline model of a Kite market: instruments, prices, books, frames.

``Market`` holds an instrument universe across every Kite segment and a
per-instrument state (last price on its tick-size grid, session OHLC,
cumulative volume and turnover, open interest, book pressure), and turns it
into Kite binary WebSocket messages exactly as the broker frames them
(broker-frames.md section 1; ``ingestor.twin.frames`` is the byte-level
reference).  The model is vectorized with numpy: a batch of packets (one or
many messages) is stepped and packed with a few dozen array operations, so
a capture of a million ticks takes seconds.

Uses:

* ``generate_capture(path, ticks, ...)`` writes a capture file (heartbeats
  between bursts, 1 to 100 packets per message, ltp / quote / full / mixed
  modes) for tests, demos and benchmarks;
* ``Market.message(subscriptions, n_packets)`` gives one message for a set of
  (token, mode) subscriptions, for a live Kite-protocol server;
* ``Market.write_instruments_csv(path)`` writes the universe in the broker's
  instruments-dump layout, so the tokens of a capture can be loaded first.

Everything is deterministic for a seed.  Tokens are ``(exchange_token << 8)
| segment``; prices are raw integers (``raw / divisor`` rupees, divisor 1e7
for CDS, 1e4 for BCD and NCO, 100 elsewhere).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "HEARTBEAT",
    "MODES",
    "SEGMENTS",
    "Instrument",
    "Market",
    "generate_capture",
    "make_universe",
]

#: The broker's keep-alive: a 1-byte binary message.
HEARTBEAT = b"\x00"
#: Mode names and the core's mode codes (MODE_LTP, MODE_QUOTE, MODE_FULL).
MODES = {"ltp": 1, "quote": 2, "full": 3}
_MODE_NAMES = {v: k for k, v in MODES.items()}

_IST = _dt.timezone(_dt.timedelta(hours=5, minutes=30))
_NS = 1_000_000_000
#: Cash-market session in IST (the model keeps one session for all segments).
SESSION_OPEN = _dt.time(9, 15)
SESSION_CLOSE = _dt.time(15, 30)
_U32_MAX = 0xFFFFFFFF
#: Cumulative counts are reset by a new session before they get near uint32.
_VOLUME_GUARD = 1 << 31


@dataclass(frozen=True)
class SegmentSpec:
    """How one Kite segment looks: dump names, divisor, instruments it lists."""

    code: int
    exchange: str          # the dump's ``exchange`` column
    divisor: int
    kinds: tuple           # instrument kinds drawn for this segment: "EQ", "FUT", "OPT", "INDEX"


#: Kite segment codes (``instrument_token & 0xff``, KiteTicker.EXCHANGE_MAP).
SEGMENTS = {
    1: SegmentSpec(1, "NSE", 100, ("EQ",)),
    2: SegmentSpec(2, "NFO", 100, ("FUT", "OPT", "OPT")),
    3: SegmentSpec(3, "CDS", 10_000_000, ("FUT", "OPT")),
    4: SegmentSpec(4, "BSE", 100, ("EQ",)),
    5: SegmentSpec(5, "BFO", 100, ("FUT", "OPT")),
    6: SegmentSpec(6, "BCD", 10_000, ("FUT", "OPT")),
    7: SegmentSpec(7, "MCX", 100, ("FUT", "FUT", "OPT")),
    8: SegmentSpec(8, "MCXSX", 100, ("EQ",)),
    9: SegmentSpec(9, "NSE", 100, ("INDEX",)),
    12: SegmentSpec(12, "NCO", 10_000, ("FUT",)),
}
#: The order segments are guaranteed a first instrument in, then the draw weights.
_SEGMENT_ORDER = (1, 2, 9, 4, 5, 3, 6, 7, 12, 8)
_SEGMENT_WEIGHTS = {1: 30, 2: 30, 4: 10, 5: 5, 3: 5, 6: 3, 7: 7, 8: 1, 9: 4, 12: 5}

_EQUITIES = ("RELIANCE", "INFY", "TCS", "HDFCBANK", "ICICIBANK", "SBIN", "ITC", "LT",
             "AXISBANK", "KOTAKBANK", "TATAMOTORS", "WIPRO", "ONGC", "NTPC", "MARUTI",
             "BHARTIARTL", "SUNPHARMA", "TITAN", "ASIANPAINT", "HINDUNILVR", "BAJFINANCE",
             "COALINDIA", "POWERGRID", "TATASTEEL", "JSWSTEEL", "ADANIPORTS", "CIPLA",
             "DRREDDY", "EICHERMOT", "GRASIM", "HCLTECH", "HEROMOTOCO", "INDUSINDBK",
             "NESTLEIND", "TECHM", "ULTRACEMCO", "UPL", "BPCL", "BRITANNIA", "DIVISLAB")
_FNO_UNDERLYINGS = ("NIFTY", "BANKNIFTY", "FINNIFTY") + _EQUITIES[:12]
_BSE_UNDERLYINGS = ("SENSEX", "BANKEX")
#: (symbol, price in rupees, raw tick) per currency pair; ticks of 0.0025.
_CURRENCIES = (("USDINR", 83.1, None), ("EURINR", 90.4, None), ("GBPINR", 105.2, None),
               ("JPYINR", 55.6, None))
#: (symbol, rupees, tick in rupees, lot)
_COMMODITIES = (("CRUDEOIL", 6500, "1", 100), ("GOLD", 62000, "1", 1), ("SILVER", 74000, "1", 30),
                ("NATURALGAS", 250, "0.1", 1250), ("COPPER", 720, "0.05", 2500),
                ("ZINC", 220, "0.05", 5000), ("GOLDM", 62000, "1", 10))
_INDICES = (("NIFTY 50", 256265, "NSE", 21700), ("NIFTY BANK", 260105, "NSE", 47500),
            ("INDIA VIX", 264969, "NSE", 14), ("NIFTY FIN SERVICE", 257801, "NSE", 21300),
            ("SENSEX", 265, "BSE", 71500), ("NIFTY IT", 259849, "NSE", 35000),
            ("NIFTY MIDCAP 100", 256777, "NSE", 46000))
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


@dataclass(frozen=True)
class Instrument:
    """One instrument of the universe, as the instruments dump lists it.

    Prices (``tick``, ``price``, ``strike``) are raw integers in units of
    ``1 / divisor`` rupees.
    """

    instrument_token: int
    exchange_token: int
    tradingsymbol: str
    name: str
    exchange: str
    segment: str           # the dump's segment column: "NSE", "NFO-OPT", "INDICES", ...
    segment_code: int      # instrument_token & 0xff
    instrument_type: str   # EQ, FUT, CE, PE
    divisor: int
    tick: int              # tick size, raw
    lot_size: int
    expiry: str            # YYYY-MM-DD or ""
    strike: int            # raw, 0 unless an option
    price: int             # initial last price, raw

    @property
    def is_index(self) -> bool:
        return self.segment_code == 9

    @property
    def has_oi(self) -> bool:
        return self.instrument_type in ("FUT", "CE", "PE")

    def csv_row(self) -> list[str]:
        """The row of the instruments dump (columns of ``Market.CSV_COLUMNS``)."""
        # The dump prints tick size 0.0 and lot 0 for indices.
        tick = "0.0" if self.is_index else _dec(self.tick, self.divisor)
        return [str(self.instrument_token), str(self.exchange_token), self.tradingsymbol,
                self.name, _dec(self.price, self.divisor), self.expiry,
                _dec(self.strike, self.divisor), tick, str(self.lot_size),
                self.instrument_type, self.segment, self.exchange]


def _dec(raw: int, divisor: int) -> str:
    """``raw / divisor`` exactly, as the dump prints numbers (``0.0``, ``2528.4``)."""
    d = (Decimal(raw) / Decimal(divisor)).normalize()
    s = format(d, "f")
    return s if "." in s else s + ".0"


def _grid(rupees: float, tick: int, divisor: int) -> int:
    """A price in rupees snapped to the tick grid, raw (at least one tick)."""
    return max(tick, int(round(rupees * divisor / tick)) * tick)


def make_universe(n_tokens: int, seed: int = 0,
                  segments: Sequence[int] | None = None) -> list[Instrument]:
    """Draw ``n_tokens`` instruments across the Kite segments, deterministically.

    Every segment of ``segments`` (default: all ten) gets one instrument
    before any gets a second, in the order NSE, NFO, INDICES, BSE, BFO, CDS,
    BCD, MCX, NCO, MCXSX; the rest are drawn by weight (NSE and NFO most).
    Tokens and ``(exchange, tradingsymbol)`` pairs are unique.
    """
    if n_tokens < 1:
        raise ValueError("a universe needs at least one instrument")
    rng = np.random.default_rng([seed, 0x1D])
    order = [s for s in _SEGMENT_ORDER if segments is None or s in segments]
    if not order:
        raise ValueError(f"no known segment in {segments!r}")
    weights = np.array([_SEGMENT_WEIGHTS[s] for s in order], float)
    codes = order[:n_tokens] + list(rng.choice(order, max(0, n_tokens - len(order)),
                                               p=weights / weights.sum()))
    used_tokens: set[int] = set()
    used_symbols: set[tuple[str, str]] = set()
    next_xtoken = {s: int(rng.integers(1000, 60000)) for s in SEGMENTS}
    indices_left = list(_INDICES)
    base_day = _dt.date(2024, 1, 25) + _dt.timedelta(days=int(rng.integers(0, 300)))
    out = []
    for code in codes:
        code = int(code)
        spec = SEGMENTS[code]
        kind = spec.kinds[int(rng.integers(len(spec.kinds)))]
        div = spec.divisor
        expiry, strike, itype, lot = "", 0, "EQ", 1
        exchange, dump_segment = spec.exchange, spec.exchange
        xtoken = None
        if kind == "INDEX":
            if indices_left:
                name, token, exchange, rupees = indices_left.pop(0)
                xtoken = token >> 8
            else:
                name, exchange, rupees = f"NIFTY SIM {len(out)}", "NSE", float(rng.uniform(5e3, 5e4))
            symbol, tick, lot, dump_segment = name, 5, 0, "INDICES"
            price = _grid(rupees, tick, div)
        elif code in (3, 6):
            sym, rupees, _ = _CURRENCIES[int(rng.integers(len(_CURRENCIES)))]
            tick = 25 * div // 10_000  # 0.0025 rupees
            price = _grid(rupees * float(rng.uniform(0.98, 1.02)), tick, div)
            name, lot = sym, 1
            symbol, expiry, itype, strike, price = _derivative(rng, sym, kind, price, tick, div,
                                                                base_day, step=0.25)
            dump_segment = f"{spec.exchange}-{'FUT' if itype == 'FUT' else 'OPT'}"
        elif code in (7, 12):
            sym, rupees, tick_r, lot = _COMMODITIES[int(rng.integers(len(_COMMODITIES)))]
            tick = int(Decimal(tick_r) * div)
            price = _grid(rupees * float(rng.uniform(0.95, 1.05)), tick, div)
            name = sym
            symbol, expiry, itype, strike, price = _derivative(rng, sym, kind, price, tick, div,
                                                                base_day, step=rupees / 50)
            dump_segment = f"{spec.exchange}-{'FUT' if itype == 'FUT' else 'OPT'}"
        elif code in (2, 5):
            pool = _FNO_UNDERLYINGS if code == 2 else _BSE_UNDERLYINGS
            sym = pool[int(rng.integers(len(pool)))]
            rupees = float(np.exp(rng.uniform(np.log(100), np.log(50000))))
            tick = 5
            lot = int(rng.choice([15, 25, 40, 50, 75, 100, 250, 500, 1000, 1500, 3500]))
            name = "" if code == 2 else sym
            symbol, expiry, itype, strike, price = _derivative(
                rng, sym, kind, _grid(rupees, tick, div), tick, div, base_day,
                step=10 ** max(0, int(np.log10(rupees)) - 2) * 5)
            dump_segment = f"{spec.exchange}-{'FUT' if itype == 'FUT' else 'OPT'}"
        else:  # cash equities: NSE, BSE, MCXSX
            sym = _EQUITIES[int(rng.integers(len(_EQUITIES)))]
            tick = 5 if rng.random() < 0.8 else 1
            name = sym
            symbol = sym if code != 4 or rng.random() < 0.5 else sym + "-BE"
            price = _grid(float(np.exp(rng.uniform(np.log(20), np.log(8000)))), tick, div)
        # Unique token and (exchange, symbol).
        while True:
            if xtoken is None:
                xtoken = next_xtoken[code]
                next_xtoken[code] += int(rng.integers(1, 40))
            token = ((xtoken << 8) | code) & _U32_MAX
            if token not in used_tokens:
                break
            xtoken = None
        base_symbol, k = symbol, 1
        while (exchange, symbol) in used_symbols:
            k += 1
            symbol = f"{base_symbol}{k}" if itype == "EQ" else f"{base_symbol}-{k}"
        used_tokens.add(token)
        used_symbols.add((exchange, symbol))
        out.append(Instrument(token, xtoken, symbol, name, exchange, dump_segment, code, itype,
                              div, tick, lot, expiry, strike, price))
    return out


def _derivative(rng, sym, kind, under, tick, div, base_day, step):
    """Symbol, expiry, type, strike and price of a future or option on ``sym``."""
    expiry = base_day + _dt.timedelta(days=int(rng.integers(0, 90)))
    tag = f"{expiry:%y}{_MONTHS[expiry.month - 1]}"
    if kind == "FUT":
        return f"{sym}{tag}FUT", expiry.isoformat(), "FUT", 0, under
    itype = "CE" if rng.random() < 0.5 else "PE"
    step_raw = max(tick, int(round(step * div / tick)) * tick)
    strike = max(step_raw, (under // step_raw + int(rng.integers(-10, 11))) * step_raw)
    intrinsic = max(0, under - strike) if itype == "CE" else max(0, strike - under)
    price = _grid((intrinsic + under * float(rng.uniform(0.002, 0.03))) / div, tick, div)
    return (f"{sym}{tag}{_dec(strike, div).rstrip('0').rstrip('.')}{itype}", expiry.isoformat(),
            itype, strike, price)


# Big-endian packet records, each with its u16 length prefix (message framing).
_LEVEL_DT = np.dtype([("q", ">u4"), ("p", ">u4"), ("o", ">u2"), ("pad", ">u2")])
_REC_DT = {
    8: np.dtype([("len", ">u2"), ("token", ">u4"), ("last", ">u4")]),
    28: np.dtype([("len", ">u2"), ("token", ">u4"), ("last", ">u4"), ("high", ">u4"),
                  ("low", ">u4"), ("open", ">u4"), ("close", ">u4"), ("chg", ">i4")]),
    32: np.dtype([("len", ">u2"), ("token", ">u4"), ("last", ">u4"), ("high", ">u4"),
                  ("low", ">u4"), ("open", ">u4"), ("close", ">u4"), ("chg", ">i4"),
                  ("ts", ">u4")]),
    44: np.dtype([("len", ">u2"), ("token", ">u4"), ("last", ">u4"), ("ltq", ">u4"),
                  ("atp", ">u4"), ("vol", ">u4"), ("tbq", ">u4"), ("tsq", ">u4"),
                  ("open", ">u4"), ("high", ">u4"), ("low", ">u4"), ("close", ">u4")]),
    184: np.dtype([("len", ">u2"), ("token", ">u4"), ("last", ">u4"), ("ltq", ">u4"),
                   ("atp", ">u4"), ("vol", ">u4"), ("tbq", ">u4"), ("tsq", ">u4"),
                   ("open", ">u4"), ("high", ">u4"), ("low", ">u4"), ("close", ">u4"),
                   ("ltt", ">u4"), ("oi", ">u4"), ("oih", ">u4"), ("oil", ">u4"),
                   ("ts", ">u4"), ("depth", _LEVEL_DT, (10,))]),
}
for _n, _dt_ in _REC_DT.items():
    assert _dt_.itemsize == _n + 2, (_n, _dt_.itemsize)
_BIG = np.int64(1) << 34  # > any uint32 price: separates groups in running max/min


class Market:
    """A seeded market model over an instrument universe.

    Parameters
    ----------
    instruments : sequence of Instrument, optional
        The universe; default ``make_universe(n_tokens, seed)``.
    n_tokens : int
        Size of the default universe.
    seed : int
        Seeds the universe (when drawn here), the walks and the clock.
    start_ns : int, optional
        Simulated clock at the start (ns since the epoch, UTC); default the
        session open (09:15 IST) of a seeded weekday in 2024.
    trade_probability : float
        Chance that a packet carries a new trade (else only the book moves).

    Attributes
    ----------
    instruments : list of Instrument
    tokens : numpy.ndarray of uint32, in universe order
    clock_ns : int
        The simulated receive time of the last message made.
    """

    #: Columns of the broker's instruments dump, in order.
    CSV_COLUMNS = ("instrument_token", "exchange_token", "tradingsymbol", "name", "last_price",
                   "expiry", "strike", "tick_size", "lot_size", "instrument_type", "segment",
                   "exchange")

    def __init__(self, instruments: Sequence[Instrument] | None = None, *, n_tokens: int = 100,
                 seed: int = 0, start_ns: int | None = None, trade_probability: float = 0.6):
        self.seed = seed
        self.instruments = list(instruments) if instruments is not None \
            else make_universe(n_tokens, seed)
        if not self.instruments:
            raise ValueError("a market needs at least one instrument")
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.trade_probability = float(trade_probability)
        inst = self.instruments
        n = len(inst)
        self.tokens = np.array([i.instrument_token for i in inst], np.uint32)
        self._index = {int(t): k for k, t in enumerate(self.tokens)}
        if len(self._index) != n:
            raise ValueError("instrument tokens must be unique")
        self.is_index = np.array([i.is_index for i in inst], bool)
        self.has_oi = np.array([i.has_oi for i in inst], bool)
        self.tick = np.array([i.tick for i in inst], np.int64)
        self.lot = np.array([max(1, i.lot_size) for i in inst], np.int64)
        p0 = np.array([i.price for i in inst], np.int64)
        # The walk stays within [p0 / 4, p0 * 3] on the grid (and well inside uint32).
        self.floor = np.maximum(self.tick, (p0 // 4) // self.tick * self.tick)
        cap = (_U32_MAX - 64 * self.tick) // self.tick * self.tick
        self.ceil = np.minimum(p0 * 3, cap)
        # Liquidity: how often an instrument trades relative to the others.
        self.activity = self.rng.lognormal(0.0, 0.8, n)
        self.activity /= self.activity.sum()
        self.last = p0.copy()
        self.close = p0.copy()
        self.open = p0.copy()
        self.high = p0.copy()
        self.low = p0.copy()
        self.volume = np.zeros(n, np.int64)
        self.turnover = np.zeros(n, np.float64)
        self.ltq = np.zeros(n, np.int64)
        self.ltt = np.zeros(n, np.int64)
        self.oi = np.where(self.has_oi, self.lot * self.rng.integers(100, 20000, n), 0)
        self.oi_high = self.oi.copy()
        self.oi_low = self.oi.copy()
        self.book_extra_buy = self.lot * self.rng.integers(0, 5000, n)
        self.book_extra_sell = self.lot * self.rng.integers(0, 5000, n)
        if start_ns is None:
            day = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(self.rng.integers(0, 330)))
            start_ns = _session_open_ns(_next_weekday(day))
        self.clock_ns = int(start_ns)
        self.sessions = 1
        self._session_end_ns = _session_close_ns(self.clock_ns)
        self._open_session(gap=False)

    # ----------------------------------------------------------- universe

    def __len__(self) -> int:
        return len(self.instruments)

    def instrument(self, token: int) -> Instrument:
        """The instrument of a token (KeyError if not in the universe)."""
        return self.instruments[self._index[int(token)]]

    def write_instruments_csv(self, path: str | os.PathLike) -> None:
        """Write the universe in the exact layout of Kite's instruments dump."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(self.CSV_COLUMNS)
            for i in self.instruments:
                w.writerow(i.csv_row())

    # ----------------------------------------------------------- sessions

    def _open_session(self, gap: bool) -> None:
        # Yesterday's last is today's close; the open gaps a little away.
        n = len(self)
        self.close = self.last.copy()
        if gap:
            ticks = np.rint(self.rng.normal(0, 0.004, n) * self.last / self.tick).astype(np.int64)
            self.last = np.clip(self.last + ticks * self.tick, self.floor, self.ceil)
        self.open = self.last.copy()
        self.high = self.last.copy()
        self.low = self.last.copy()
        self.volume[:] = 0
        self.turnover[:] = 0
        self.ltq[:] = 0
        self.ltt[:] = self.clock_ns // _NS
        self.oi_high = self.oi.copy()
        self.oi_low = self.oi.copy()

    def new_session(self) -> None:
        """Move the clock to the next trading day's open and reset the day's fields.

        Volume, turnover and the day's OI range restart; the previous last
        price becomes ``close``; ``open``/``high``/``low`` restart at the
        (slightly gapped) opening price.  Consumers see cumulative volume go
        back to small values, as after a real overnight.
        """
        day = _dt.datetime.fromtimestamp(self.clock_ns / _NS, _IST).date()
        self.clock_ns = _session_open_ns(_next_weekday(day + _dt.timedelta(days=1)))
        self._session_end_ns = _session_close_ns(self.clock_ns)
        self.sessions += 1
        self._open_session(gap=True)

    def advance(self, ns: int) -> int:
        """Move the simulated clock forward (into the next session past the close)."""
        self.clock_ns += int(ns)
        if self.clock_ns >= self._session_end_ns:
            self.new_session()
        return self.clock_ns

    # ----------------------------------------------------------- messages

    def message(self, subscriptions: Mapping[int, str] | Iterable[tuple[int, str | int]],
                n_packets: int | None = None, recv_ns: int | None = None) -> bytes:
        """One binary message for subscribed tokens in their modes.

        Parameters
        ----------
        subscriptions : mapping token -> mode, or iterable of (token, mode)
            Modes are ``"ltp"``, ``"quote"``, ``"full"`` (or 1, 2, 3).
            Tokens outside the universe are skipped (the broker sends
            nothing for them).
        n_packets : int, optional
            Packets in the message; default one per subscribed token.  Up
            to the number of tokens, each token appears at most once.
        recv_ns : int, optional
            The message's time (a live server passes the wall clock); by
            default the simulated clock advances a few milliseconds.

        Returns
        -------
        bytes
            The message; ``HEARTBEAT`` when nothing is subscribed.
        """
        pairs = subscriptions.items() if isinstance(subscriptions, Mapping) else subscriptions
        idx, modes = [], []
        for token, mode in pairs:
            k = self._index.get(int(token))
            if k is None:
                continue
            idx.append(k)
            modes.append(MODES[mode] if isinstance(mode, str) else int(mode))
        if not idx or n_packets == 0:
            return HEARTBEAT
        idx_a = np.array(idx, np.int64)
        modes_a = np.array(modes, np.int8)
        if n_packets is not None:
            pick = self._pick(len(idx_a), int(n_packets), self.activity[idx_a])
            idx_a, modes_a = idx_a[pick], modes_a[pick]
        if recv_ns is None:
            recv_ns = self.advance(int(self.rng.integers(1_000_000, 20_000_000)))
        else:
            self.clock_ns = int(recv_ns)
        buf, offsets = self.pack(idx_a, modes_a, np.array([len(idx_a)]),
                                 np.array([recv_ns], np.int64))
        return buf.tobytes()

    def _pick(self, k: int, n: int, weights: np.ndarray) -> np.ndarray:
        """``n`` of ``k`` candidates, weighted by activity, distinct while n <= k."""
        p = weights / weights.sum()
        return self.rng.choice(k, n, replace=n > k, p=p)

    def pack(self, idx: np.ndarray, modes: np.ndarray, counts: np.ndarray,
             times_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step the model for a batch of packets and frame them into messages.

        Parameters
        ----------
        idx : int array (n,)
            Universe indices, in packet order (repeats allowed).
        modes : int array (n,)
            Mode code per packet (1 ltp, 2 quote, 3 full); an index
            instrument's quote/full packets are the 28/32-byte index ones.
        counts : int array (m,)
            Packets per message (each 0..65535), summing to n.
        times_ns : int array (m,)
            Receive time of each message.

        Returns
        -------
        (buf, offsets) : (uint8 array, int64 array (m + 1,))
            Message ``i`` is ``buf[offsets[i]:offsets[i + 1]]``.
        """
        idx = np.asarray(idx, np.int64)
        modes = np.asarray(modes, np.int64)
        counts = np.asarray(counts, np.int64)
        times_ns = np.asarray(times_ns, np.int64)
        n, m = len(idx), len(counts)
        if counts.sum() != n or len(modes) != n or len(times_ns) != m:
            raise ValueError("packets, modes, counts and times do not agree")
        f = self._step(idx, np.repeat(times_ns, counts))
        lengths = np.where(self.is_index[idx], np.array([0, 8, 28, 32])[modes],
                           np.array([0, 8, 44, 184])[modes])
        sizes = lengths + 2
        msg_of = np.repeat(np.arange(m), counts)
        csz = np.concatenate(([0], np.cumsum(sizes)))
        pkt_start = csz[:-1] + 2 * (msg_of + 1)
        first = np.concatenate(([0], np.cumsum(counts)))
        offsets = csz[first] + 2 * np.arange(m + 1)
        buf = np.empty(int(offsets[-1]), np.uint8)
        starts = offsets[:-1]
        buf[starts] = (counts >> 8).astype(np.uint8)
        buf[starts + 1] = (counts & 0xFF).astype(np.uint8)
        for plen, dt in _REC_DT.items():
            sel = np.flatnonzero(lengths == plen)
            if not len(sel):
                continue
            rec = np.zeros(len(sel), dt)
            rec["len"] = plen
            rec["token"] = self.tokens[idx[sel]]
            rec["last"] = f["last"][sel]
            if plen != 8:
                for k in ("open", "high", "low", "close"):
                    rec[k] = f[k][sel]
            if plen in (28, 32):
                rec["chg"] = f["last"][sel] - f["close"][sel]
                if plen == 32:
                    rec["ts"] = f["ts"][sel]
            elif plen != 8:
                for k in ("ltq", "atp", "vol", "tbq", "tsq"):
                    rec[k] = f[k][sel]
                if plen == 184:
                    for k in ("ltt", "oi", "oih", "oil", "ts"):
                        rec[k] = f[k][sel]
                    d = rec["depth"]
                    d["q"][:, :5] = f["bq"][sel]
                    d["p"][:, :5] = f["bp"][sel]
                    d["o"][:, :5] = f["bo"][sel]
                    d["q"][:, 5:] = f["aq"][sel]
                    d["p"][:, 5:] = f["ap"][sel]
                    d["o"][:, 5:] = f["ao"][sel]
            raw = rec.view(np.uint8).reshape(len(sel), plen + 2)
            buf[pkt_start[sel][:, None] + np.arange(plen + 2)] = raw
        return buf, offsets

    def _step(self, idx: np.ndarray, t_ns: np.ndarray) -> dict:
        """Advance the instruments of ``idx`` packet by packet; the packets' fields.

        Repeated instruments in one batch are handled in order (grouped
        cumulative sums), so a batch equals the same packets made one by one.
        """
        rng = self.rng
        n = len(idx)
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        start = np.ones(n, bool)
        start[1:] = s[1:] != s[:-1]
        gid = np.cumsum(start) - 1
        spos = np.flatnonzero(start)
        epos = np.concatenate((spos[1:] - 1, [n - 1]))
        ar = np.arange(n)

        def gcum(x):  # cumulative sum within each instrument's run
            cs = np.cumsum(x)
            return cs - (cs[spos] - x[spos])[gid]

        def gmax(x):
            return np.maximum.accumulate(x + gid * _BIG) - gid * _BIG

        def gmin(x):
            return np.minimum.accumulate(x - gid * _BIG) + gid * _BIG

        def gffill(mask, values, before):  # latest masked value within the run, else ``before``
            run = np.maximum.accumulate(np.where(mask, ar, -1))
            ok = run >= spos[gid]
            return np.where(ok, values[np.maximum(run, 0)], before)

        tick, lot = self.tick[s], self.lot[s]
        # The exchange stamps a packet about a millisecond before it arrives.
        ts = (t_ns[order] - 1_000_000) // _NS
        trade = rng.random(n) < self.trade_probability
        steps = rng.choice(np.array([-2, -1, 0, 1, 2]), n, p=[0.05, 0.3, 0.3, 0.3, 0.05])
        last = np.clip(self.last[s] + gcum(steps * trade * tick), self.floor[s], self.ceil[s])
        qty = lot * rng.geometric(0.3, n) * trade
        vol = self.volume[s] + gcum(qty)
        turn = self.turnover[s] + gcum(last * qty.astype(np.float64))
        atp = np.where(vol > 0, np.rint(turn / np.maximum(vol, 1)), 0).astype(np.int64)
        high = np.maximum(gmax(last), self.high[s])
        low = np.minimum(gmin(last), self.low[s])
        ltq = gffill(trade, qty, self.ltq[s])
        ltt = gffill(trade, ts, self.ltt[s])
        doi = rng.integers(-3, 4, n) * lot * trade * self.has_oi[s]
        oi = np.maximum(0, self.oi[s] + gcum(doi))
        oih = np.maximum(gmax(oi), self.oi_high[s])
        oil = np.minimum(gmin(oi), self.oi_low[s])
        xb = np.maximum(0, self.book_extra_buy[s] + gcum(lot * rng.integers(-20, 21, n)))
        xs = np.maximum(0, self.book_extra_sell[s] + gcum(lot * rng.integers(-20, 21, n)))

        # The book: best ask at or one tick above the last trade, best bid
        # 1..3 ticks under it (so bid <= last <= ask and bid < ask), then
        # levels 1..3 ticks apart; thin books leave deeper levels empty (0).
        a0 = rng.integers(0, 2, n)
        spread = np.maximum(1, a0 + rng.integers(0, 3, n))
        ask0 = last + a0 * tick
        bid0 = ask0 - spread * tick
        gaps = rng.integers(1, 4, (n, 5))
        gaps[:, 0] = 0
        depth_off = np.cumsum(gaps, axis=1) * tick[:, None]
        bp = bid0[:, None] - depth_off
        ap = ask0[:, None] + depth_off
        lvl = np.arange(5)
        thin = rng.random(n) < 0.08
        nb = np.where(thin, rng.integers(0, 5, n), 5)
        na = np.where(thin, rng.integers(0, 5, n), 5)
        bmask = (lvl[None, :] < nb[:, None]) & (bp > 0)
        amask = lvl[None, :] < na[:, None]
        bq = lot[:, None] * rng.geometric(0.05, (n, 5)) * bmask
        aq = lot[:, None] * rng.geometric(0.05, (n, 5)) * amask
        bo = np.minimum(rng.integers(1, 60, (n, 5)), bq // lot[:, None]) * bmask
        ao = np.minimum(rng.integers(1, 60, (n, 5)), aq // lot[:, None]) * amask
        bp = bp * bmask
        ap = ap * amask

        # The state after the batch: each instrument's last packet.
        last_of = s[epos]
        self.last[last_of] = last[epos]
        self.volume[last_of] = vol[epos]
        self.turnover[last_of] = turn[epos]
        self.high[last_of] = high[epos]
        self.low[last_of] = low[epos]
        self.ltq[last_of] = ltq[epos]
        self.ltt[last_of] = ltt[epos]
        self.oi[last_of] = oi[epos]
        self.oi_high[last_of] = oih[epos]
        self.oi_low[last_of] = oil[epos]
        self.book_extra_buy[last_of] = xb[epos]
        self.book_extra_sell[last_of] = xs[epos]

        sorted_fields = {
            "last": last, "open": self.open[s], "high": high, "low": low, "close": self.close[s],
            "ltq": ltq, "atp": atp, "vol": vol,
            "tbq": bq.sum(axis=1) + xb, "tsq": aq.sum(axis=1) + xs,
            "ltt": ltt, "oi": oi, "oih": oih, "oil": oil, "ts": ts,
            "bq": bq, "bp": bp, "bo": bo, "aq": aq, "ap": ap, "ao": ao,
        }
        out = {}
        for k, v in sorted_fields.items():
            u = np.empty_like(v)
            u[order] = v
            out[k] = u
        return out

    def volume_near_limit(self) -> bool:
        """True when a cumulative count nears uint32 (time for a new session)."""
        return bool(self.volume.max() >= _VOLUME_GUARD or self.oi.max() >= _VOLUME_GUARD)


def _next_weekday(day: _dt.date) -> _dt.date:
    while day.weekday() >= 5:
        day += _dt.timedelta(days=1)
    return day


def _session_open_ns(day: _dt.date) -> int:
    return int(_dt.datetime.combine(day, SESSION_OPEN, _IST).timestamp()) * _NS


def _session_close_ns(now_ns: int) -> int:
    day = _dt.datetime.fromtimestamp(now_ns / _NS, _IST).date()
    return int(_dt.datetime.combine(day, SESSION_CLOSE, _IST).timestamp()) * _NS


def generate_capture(path: str | os.PathLike, ticks: int, tokens: int = 100, mode: str = "mixed",
                     seed: int = 0, *, market: Market | None = None, stream: str | None = None,
                     session_reset_probability: float = 0.002,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Write a simulated Kite capture of ``ticks`` packets.

    Bursts of messages (1 to 100 packets each, a few ms apart) alternate
    with quiet gaps in which the broker's 1-byte heartbeats arrive about
    once a second.  Occasionally (and whenever a cumulative count nears
    uint32, or the clock passes the close) the market opens a new session.

    Parameters
    ----------
    path : path-like
        The capture file to write (``ingestor.feed.capture`` format).
    ticks : int
        Packets to write (heartbeats not counted).
    tokens : int
        Instruments in the universe (ignored when ``market`` is given).
    mode : {"ltp", "quote", "full", "mixed"}
        Every packet in this mode, or ``mixed``: each instrument gets a mode
        of its own, and some change mode mid-stream (as after a client's
        ``mode`` request).  Mixed captures cover every (segment, mode)
        combination whatever the seed (given ``ticks >= 3 * tokens``): the
        capture is in thirds, each instrument in another mode in each (a
        client's ``mode`` request for all), and each third opens with one
        packet of every instrument in its new mode (the broker's snapshot
        after a mode request); within a segment the modes take turns, so a
        segment of three or more instruments has all three in every third.
        Tests that check coverage rely on this: random modes let the few
        index instruments all draw ``ltp`` for some seeds.
    seed : int
        Same seed, same arguments: the same file, byte for byte (the stream
        id is derived from the seed unless ``stream`` is given).
    market : Market, optional
        Use (and advance) this market instead of a fresh one.
    progress : callable, optional
        Called with the packets written so far after each burst.

    Returns
    -------
    dict
        ``messages`` (binary, heartbeats included), ``heartbeats``,
        ``packets``, ``bytes`` (file size), ``sessions``, ``stream``,
        ``first_ns`` and ``last_ns`` (the capture's time span).
    """
    from ingestor.feed.capture import KIND_BINARY, CaptureHeader, CaptureWriter

    if ticks < 0:
        raise ValueError("ticks must be >= 0")
    if mode not in ("ltp", "quote", "full", "mixed"):
        raise ValueError(f"unknown mode {mode!r}")
    mk = market if market is not None else Market(n_tokens=tokens, seed=seed)
    rng = np.random.default_rng([seed, 0xCA9])
    k = len(mk)
    if mode == "mixed":
        # per segment, in a random order, modes take turns from a random start
        base = np.empty(k, np.int64)
        seg = np.array([i.segment_code for i in mk.instruments])
        for code in np.unique(seg):
            members = rng.permutation(np.flatnonzero(seg == code))
            base[members] = (np.arange(len(members)) + rng.integers(0, 3)) % 3
    tok_mode = np.full(k, MODES["ltp" if mode == "mixed" else mode])
    phase = -1
    stream = stream or f"sim-{seed}-{k}-{mode}"
    header = CaptureHeader(broker="kite", stream=stream, first_seq=0,
                           extra={"source": "ingestor simulate", "seed": seed, "tokens": k,
                                  "mode": mode})
    written = heartbeats = messages = 0
    first_ns = mk.clock_ns
    with CaptureWriter(path, header) as w:
        while written < ticks:
            if mk.volume_near_limit() or rng.random() < session_reset_probability:
                mk.new_session()
            snapshot = None
            if mode == "mixed" and min(2, 3 * written // ticks) != phase:
                # A new third: every instrument in its next mode, the snapshot first.
                phase = min(2, 3 * written // ticks)
                tok_mode = ((base + phase) % 3 + 1).astype(tok_mode.dtype)
                snapshot = rng.permutation(k)
            elif mode == "mixed" and rng.random() < 0.05:
                # A client switched a few instruments to another mode.
                j = rng.integers(0, k, max(1, k // 50))
                tok_mode[j] = rng.integers(1, 4, len(j))
            n_msgs = int(rng.integers(1, 40))
            counts = rng.integers(1, 101, n_msgs)
            if snapshot is not None:  # in messages of at most 100 packets, then the burst
                snap_counts = np.full(-(-k // 100), 100, counts.dtype)
                snap_counts[-1] = k - 100 * (len(snap_counts) - 1)
                counts = np.concatenate([snap_counts, counts])
                n_msgs = len(counts)
            # the last burst ends exactly at ``ticks`` (a mixed capture's, at each third)
            end = ticks if mode != "mixed" or phase == 2 else -(-(phase + 1) * ticks // 3)
            cum = np.cumsum(counts)
            if cum[-1] > end - written:
                n_msgs = int(np.searchsorted(cum, end - written)) + 1
                counts = counts[:n_msgs]
                counts[-1] -= int(cum[n_msgs - 1] - (end - written))
            gaps = rng.integers(50_000, 8_000_000, n_msgs)
            times = mk.clock_ns + np.cumsum(gaps)
            if snapshot is None:
                idx = np.concatenate([mk._pick(k, int(c), mk.activity) for c in counts])
            else:  # the snapshot (cut short only by the capture's end), then the picks
                idx = np.concatenate([snapshot[:int(counts.sum())],
                                      *(mk._pick(k, int(c), mk.activity)
                                        for c in counts[len(snap_counts):])])
            buf, off = mk.pack(idx, tok_mode[idx], counts, times)
            mv = memoryview(buf)
            for i in range(n_msgs):
                w.write(mv[off[i]:off[i + 1]], KIND_BINARY, int(times[i]))
            messages += n_msgs
            written += int(counts.sum())
            if progress is not None:
                progress(written)
            mk.clock_ns = int(times[-1])
            # A quiet spell: heartbeats about every second until the next burst.
            quiet = int(rng.integers(100_000_000, 3_500_000_000))
            for t in range(_NS, quiet - 100_000_000, _NS):
                w.write(HEARTBEAT, KIND_BINARY, mk.clock_ns + t + int(rng.integers(0, 50_000_000)))
                heartbeats += 1
            mk.advance(quiet)
        size = w.bytes
    return {"messages": messages + heartbeats, "heartbeats": heartbeats, "packets": written,
            "bytes": size, "sessions": mk.sessions, "stream": stream, "first_ns": first_ns,
            "last_ns": mk.clock_ns, "tokens": k}
