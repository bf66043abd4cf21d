"""Pure-Python twin of the aggregation engine (``ingestor._core.Engine``).

The test oracle for tick rows, candles and book snapshots: written for
clarity, one decoded tick at a time, with Python integers (so no width can
overflow) and a bucket computed afresh for every tick.  It reads the same
decoded inputs as the core (``TICK_DTYPE``/``DEPTH_DTYPE`` arrays) and
produces the same rows as dicts keyed by the core dtypes' field names
(``as_dicts`` turns core output into the same shape).  Its outputs are
unbounded lists: it has no buffer protocol.
"""

from __future__ import annotations

import datetime

DEFAULT_TIMEFRAMES = ("1s", "5s", "1m", "5m", "15m", "1h", "1d")

ROW_HAS_QUANTITY = 1
ROW_HAS_VOLUME = 2
ROW_HAS_OI = 4
ROW_HAS_BOOK = 8
ROW_HAS_EXCHANGE_TIME = 16
CANDLE_HAS_VWAP = 1
CANDLE_HAS_OI = 2
CANDLE_REWRITE = 4      # a version of the candle may be stored already (written or seeded)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BOOK = ("bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders")


def timeframe_us(label: str) -> int:
    """Length of a timeframe label (``"15m"``) in microseconds."""
    return int(label[:-1]) * _UNITS[label[-1]] * 1_000_000


def _clock_us(value) -> int:
    if isinstance(value, datetime.timedelta):
        return round(value / datetime.timedelta(microseconds=1))
    if isinstance(value, int):
        return value * 1_000_000
    sign = -1 if value.startswith("-") else 1
    parts = [int(p) for p in value.lstrip("+-").split(":")] + [0]
    return sign * (parts[0] * 3600 + parts[1] * 60 + parts[2]) * 1_000_000


def divisor_of(token: int) -> int:
    """Kite's price divisor by segment (KiteTicker._parse_binary)."""
    seg = token & 0xFF
    return 10_000_000 if seg == 3 else 10_000 if seg in (6, 12) else 100


def round_half_away(num: int, den: int) -> int:
    """``num / den`` rounded half away from zero (``den > 0``)."""
    q, r = divmod(abs(num), den)
    if 2 * r >= den:
        q += 1
    return q if num >= 0 else -q


def as_dicts(array) -> list[dict]:
    """Rows of a structured numpy array as dicts of Python ints (lists for books)."""
    names = array.dtype.names
    out = []
    for rec in array:
        d = {}
        for name in names:
            v = rec[name]
            d[name] = [int(x) for x in v] if getattr(v, "ndim", 0) else int(v)
        out.append(d)
    return out


class _Instrument:
    def __init__(self, token: int):
        self.token = token
        self.instrument_id = None
        self.divisor = divisor_of(token)
        self.last_time = None
        self.last_volume = None
        self.candles: list[dict | None] = []
        self.book = None           # latest snapshot row
        self.pending_end = None    # end of the pending snapshot's interval
        self.pending_stored = False  # flush() wrote the pending book already


class Engine:
    """The aggregation engine, in Python (see ``ingestor._core.Engine``)."""

    def __init__(self, timeframes=DEFAULT_TIMEFRAMES, utc_offset="+05:30", origin="00:00",
                 snapshot_interval_us=1_000_000):
        self.timeframes = tuple(timeframes)
        self.lengths = [timeframe_us(tf) for tf in self.timeframes]
        self.offset = _clock_us(utc_offset)
        self.origin = _clock_us(origin)
        self.interval = snapshot_interval_us
        self.instruments: dict[int, _Instrument] = {}   # insertion order = slot order
        self.tick_rows: list[dict] = []
        self.candles: list[dict] = []
        self.snapshots: list[dict] = []
        #: (time_us, instrument_id) of flushed books a later book of their interval replaced
        self.retracted: list[tuple[int, int]] = []

    # instruments ------------------------------------------------------------
    def _inst(self, token: int) -> _Instrument:
        inst = self.instruments.get(token)
        if inst is None:
            inst = self.instruments[token] = _Instrument(token)
            inst.candles = [None] * len(self.timeframes)
        return inst

    def set_instrument(self, token: int, instrument_id: int) -> None:
        self._inst(token).instrument_id = instrument_id

    def seed(self, token: int, last_time_us: int, last_cum_volume=None) -> None:
        inst = self._inst(token)
        for tf, c in enumerate(inst.candles):
            if c is not None and last_time_us < c["start"]:
                raise ValueError(f"last_time_us {last_time_us} is before the forming "
                                 f"{self.timeframes[tf]} candle")
        inst.last_time = last_time_us
        inst.last_volume = last_cum_volume

    def seed_candle(self, token: int, timeframe_index: int, start_us: int, open: int, high: int,
                    low: int, close: int, volume: int, trade_count: int, pv: int,
                    oi=None, stored: bool = False) -> None:
        """Restore a forming candle (see ``ingestor._core.Engine.seed_candle``)."""
        if not 0 <= timeframe_index < len(self.lengths):
            raise ValueError(f"timeframe_index {timeframe_index} out of range")
        if self.bucket(start_us, self.lengths[timeframe_index]) != start_us:
            raise ValueError(f"start_us {start_us} is not a bucket start")
        if not 0 <= low <= min(open, close) <= max(open, close) <= high < 1 << 32:
            raise ValueError("inconsistent or out-of-range prices")
        if not 0 <= volume < 1 << 63 or not 1 <= trade_count < 1 << 32:
            raise ValueError("volume or trade_count out of range")
        if not low * volume <= pv <= high * volume:
            raise ValueError(f"pv {pv} outside [low x volume, high x volume]")
        if oi is not None and not 0 <= oi < 1 << 32:
            raise ValueError(f"oi {oi} is not a uint32")
        inst = self.instruments.get(token)
        if inst is None or inst.instrument_id is None:
            raise ValueError(f"token {token} has no instrument id: set_instrument() first")
        if inst.last_time is None or inst.last_time < start_us:
            raise ValueError("seed() the instrument's last time (at or after start_us) first")
        inst.candles[timeframe_index] = {"start": start_us, "open": open, "high": high,
                                         "low": low, "close": close, "count": trade_count,
                                         "volume": volume, "pv": pv, "oi": oi, "emitted": stored,
                                         "written": True}

    def forming(self) -> list[dict]:
        """Every instrument's forming candles with their exact state (emitted or not).

        One dict per (instrument, timeframe) holding a candle: ``token``,
        ``timeframe_index`` and ``seed_candle``'s other arguments; with the
        instrument's ``last_time_us`` and ``last_cum_volume`` (``seed``'s).
        """
        out = []
        for inst in self.instruments.values():
            for tf, c in enumerate(inst.candles):
                if c is not None:
                    out.append({"token": inst.token, "timeframe_index": tf,
                                "start_us": c["start"], "open": c["open"], "high": c["high"],
                                "low": c["low"], "close": c["close"], "volume": c["volume"],
                                "trade_count": c["count"], "pv": c["pv"], "oi": c["oi"],
                                "last_time_us": inst.last_time,
                                "last_cum_volume": inst.last_volume})
        return out

    def unknown_tokens(self, ticks) -> list[int]:
        return sorted({int(t) for t in ticks["instrument_token"]
                       if int(t) not in self.instruments
                       or self.instruments[int(t)].instrument_id is None})

    def bucket(self, t: int, length: int) -> int:
        """Start of the bucket of ``length`` µs holding ``t`` (local midnight + origin)."""
        local = t + self.offset - self.origin
        return (local // length) * length - (self.offset - self.origin)

    # candles ----------------------------------------------------------------
    def _candle_row(self, inst: _Instrument, tf: int, c: dict) -> dict:
        vwap = 0
        flags = 0
        if c["volume"]:
            # vwap * 1e7 = sum(price * dv) / sum(dv) * 1e7 with price = raw / divisor
            vwap = round_half_away(c["pv"] * 10_000_000, c["volume"] * inst.divisor)
            flags |= CANDLE_HAS_VWAP
        oi = 0
        if c["oi"] is not None:
            oi = c["oi"]
            flags |= CANDLE_HAS_OI
        if c.get("written"):
            flags |= CANDLE_REWRITE
        return {"time_us": c["start"], "volume": c["volume"], "trade_count": c["count"],
                "vwap_e7": vwap, "open_interest": oi, "instrument_id": inst.instrument_id,
                "instrument_token": inst.token, "open": c["open"], "high": c["high"],
                "low": c["low"], "close": c["close"], "divisor": inst.divisor,
                "timeframe": tf, "flags": flags}

    def process(self, ticks, depth=None) -> None:
        """Aggregate every row of a ``TICK_DTYPE`` array (books from ``depth``)."""
        for rec in ticks:
            tk = {name: int(rec[name]) for name in ticks.dtype.names}
            book = None
            if tk["length"] == 184:
                d = depth[tk["depth_row"]]
                book = {name: [int(x) for x in d[name]] for name in _BOOK}
            self._tick(tk, book)

    def _tick(self, tk: dict, book) -> None:
        inst = self.instruments[tk["instrument_token"]]
        assert inst.instrument_id is not None
        t = tk["recv_ns"] // 1000
        if inst.last_time is not None and t <= inst.last_time:
            t = inst.last_time + 1
        inst.last_time = t
        length = tk["length"]
        has_volume = length in (44, 184)
        full = length == 184
        flags = 0
        row = {"time_us": t, "exchange_time_us": 0, "seq": tk["seq"],
               "instrument_id": inst.instrument_id, "instrument_token": inst.token,
               "price": tk["last_price"], "quantity": 0, "volume": 0, "oi": 0,
               "bid_price": 0, "bid_quantity": 0, "ask_price": 0, "ask_quantity": 0,
               "divisor": tk["divisor"], "flags": 0, "segment": tk["segment"],
               "mode": tk["mode"]}
        dv = 0
        if has_volume:
            v = tk["volume_traded"]
            row["quantity"] = tk["last_traded_quantity"]
            row["volume"] = v
            flags |= ROW_HAS_QUANTITY | ROW_HAS_VOLUME
            if inst.last_volume is not None:
                dv = v - inst.last_volume if v >= inst.last_volume else v
            inst.last_volume = v
        if full:
            row["oi"] = tk["oi"]
            row["bid_price"] = book["bid_price"][0]
            row["bid_quantity"] = book["bid_quantity"][0]
            row["ask_price"] = book["ask_price"][0]
            row["ask_quantity"] = book["ask_quantity"][0]
            flags |= ROW_HAS_OI | ROW_HAS_BOOK
        if tk["exchange_timestamp"]:
            row["exchange_time_us"] = (tk["exchange_timestamp"] * 1_000_000
                                       + int(tk.get("exchange_ms", 0) or 0) * 1000)
            flags |= ROW_HAS_EXCHANGE_TIME
        row["flags"] = flags
        self.tick_rows.append(row)

        price = tk["last_price"]
        for tf, length_us in enumerate(self.lengths):
            start = self.bucket(t, length_us)
            c = inst.candles[tf]
            if c is not None and c["start"] == start:
                c["high"] = max(c["high"], price)
                c["low"] = min(c["low"], price)
                c["close"] = price
                c["count"] += 1
                c["volume"] += dv
                c["pv"] += price * dv
                c["emitted"] = False   # reopened after advance(): written again later
            else:
                assert c is None or start > c["start"]
                if c is not None and not c["emitted"]:
                    self.candles.append(self._candle_row(inst, tf, c))
                c = inst.candles[tf] = {"start": start, "open": price, "high": price,
                                        "low": price, "close": price, "count": 1,
                                        "volume": dv, "pv": price * dv, "oi": None,
                                        "emitted": False}
            if full:
                c["oi"] = tk["oi"]

        if full:
            if self.interval > 0 and inst.pending_end is not None:
                if t >= inst.pending_end:
                    if not inst.pending_stored:
                        self.snapshots.append(dict(inst.book))
                    inst.pending_end = None
                    inst.pending_stored = False
                elif inst.pending_stored:
                    # flush() wrote this interval's book so far; a later one replaces it
                    self.retracted.append((inst.book["time_us"], inst.instrument_id))
                    inst.pending_stored = False
            inst.book = {"time_us": t, "instrument_id": inst.instrument_id,
                         "instrument_token": inst.token, "divisor": inst.divisor,
                         "total_bid_quantity": tk["total_buy_quantity"],
                         "total_ask_quantity": tk["total_sell_quantity"], **book}
            if self.interval == 0:
                self.snapshots.append(dict(inst.book))
            elif inst.pending_end is None:
                inst.pending_end = self.bucket(t, self.interval) + self.interval

    # closing ------------------------------------------------------------------
    def _close(self, now_us, everything: bool) -> None:
        for inst in self.instruments.values():
            for tf, c in enumerate(inst.candles):
                if c is not None and not c["emitted"] and (
                        everything or c["start"] + self.lengths[tf] <= now_us):
                    self.candles.append(self._candle_row(inst, tf, c))
                    c["emitted"] = c["written"] = True
            if inst.pending_end is None:
                continue
            ended = not everything and inst.pending_end <= now_us
            if everything or ended:
                if not inst.pending_stored:
                    self.snapshots.append(dict(inst.book))
                if ended:
                    inst.pending_end = None
                    inst.pending_stored = False
                else:
                    # the interval may go on (a restart from committed state): kept pending
                    inst.pending_stored = True

    def advance(self, now_us: int) -> None:
        self._close(now_us, False)

    def flush(self) -> None:
        self._close(None, True)

    def open_candles(self) -> list[dict]:
        return [self._candle_row(inst, tf, c)
                for inst in self.instruments.values()
                for tf, c in enumerate(inst.candles)
                if c is not None and not c["emitted"]]
