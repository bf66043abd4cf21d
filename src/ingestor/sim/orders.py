"""Simulated order lifecycles as Kite order postback messages.

:class:`OrderFlow` is a seeded generator of the text messages Kite sends on the ticker
WebSocket for order updates, ``{"type": "order", "data": {...}}``, with the field set of the
official sample postback (Kite Connect v3 docs, "Postbacks"; kiteconnect-mocks
``postback.json``).  Each order lives a realistic life on one of the given instruments:

* MARKET: ``OPEN``, one to three fills (``UPDATE`` while partial), ``COMPLETE``;
* LIMIT: ``OPEN``, perhaps modifications (``UPDATE`` with a new price or quantity), partial
  fills, then ``COMPLETE`` -- or ``CANCELLED`` after zero or more partial fills;
* SL / SL-M: ``TRIGGER PENDING`` first, then as LIMIT / MARKET once triggered;
* a few are ``REJECTED`` by the broker's risk checks straight away.

Fill prices walk around each instrument's price in ticks; ``average_price`` is the running
volume-weighted average rounded to 4 decimals, as a broker reports a rounded average.
Events of one order are at least one second apart (Kite's timestamps have one-second
resolution), and orders interleave on a shared clock.  Delivery is imperfect on purpose:
some messages are duplicated and some delivered late, after later ones.  Tags name a few
strategies (some orders untagged).

The same seed and arguments give the same messages.  :attr:`OrderFlow.final` holds the last
state of every order generated, which is what the store must end with once every message
was delivered (:meth:`OrderFlow.drain` finishes all live orders).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import random
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Sequence

import msgspec

from ingestor.orders.postback import IST

__all__ = ["OrderFlow", "SimInstrument", "DEFAULT_STRATEGIES"]

#: Tags of the simulated strategies.
DEFAULT_STRATEGIES = ("momentum", "mean_revert", "pairs_arb")

_TS = "%Y-%m-%d %H:%M:%S"
_AVG_EXP = Decimal("0.0001")
_encoder = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True)
class SimInstrument:
    """An instrument orders are placed on (``price`` is a starting price)."""

    instrument_token: int
    exchange: str
    tradingsymbol: str
    price: Decimal
    tick_size: Decimal = Decimal("0.05")

    @classmethod
    def of(cls, x: Any) -> "SimInstrument":
        """From a ``SimInstrument``, a mapping, or a tuple ``(token, exchange, symbol, price[, tick])``."""
        if isinstance(x, SimInstrument):
            return x
        if isinstance(x, dict):
            tok = x.get("instrument_token", x.get("token"))
            sym = x.get("tradingsymbol", x.get("symbol"))
            return cls(int(tok), str(x["exchange"]), str(sym), Decimal(str(x["price"])),
                       Decimal(str(x.get("tick_size", "0.05"))))
        tok, exch, sym, price, *rest = x
        return cls(int(tok), str(exch), str(sym), Decimal(str(price)),
                   Decimal(str(rest[0])) if rest else Decimal("0.05"))


class OrderFlow:
    """A seeded stream of order postback messages.

    Parameters
    ----------
    instruments : sequence
        :class:`SimInstrument` or ``(token, exchange, tradingsymbol, price[, tick_size])``
        tuples or mappings with those keys.
    seed : int
        Same seed, same messages.
    strategies : sequence of str
        Tags of the orders (``untagged`` of them get none).
    untagged : float
        Share of orders without a tag.
    duplicate, reorder : float
        Probability that a message is delivered twice / delivered late (after up to
        ``max_delay`` later messages).
    concurrent : int
        Orders live at once.
    start : datetime
        The clock's start (default 2024-01-15 09:15 IST, a market open).

    Examples
    --------
    >>> flow = OrderFlow([(779521, "NSE", "SBIN", "470.35")], seed=1)
    >>> msgs = flow.next_messages(5)
    >>> len(msgs), msgs[0].startswith('{"type":"order","data":{')
    (5, True)
    """

    def __init__(self, instruments: Iterable[Any], seed: int = 0, *,
                 strategies: Sequence[str] = DEFAULT_STRATEGIES, untagged: float = 0.1,
                 duplicate: float = 0.05, reorder: float = 0.05, max_delay: int = 5,
                 concurrent: int = 8, start: dt.datetime | None = None):
        self.instruments = [SimInstrument.of(x) for x in instruments]
        if not self.instruments:
            raise ValueError("OrderFlow needs at least one instrument")
        self.strategies = list(strategies)
        self.untagged = untagged
        self.duplicate = duplicate
        self.reorder = reorder
        self.max_delay = max(1, max_delay)
        self.concurrent = max(1, concurrent)
        self._rng = random.Random(seed)
        self._seed = seed
        self._clock = start or dt.datetime(2024, 1, 15, 9, 15, tzinfo=IST)
        self._prices = {i.instrument_token: i.price for i in self.instruments}
        self._events: list[tuple[dt.datetime, int, str, dict]] = []  # heap
        self._live: dict[str, int] = {}   # order_id -> events not yet emitted
        self._delayed: list[tuple[int, int, str]] = []  # heap (release at, seq, message)
        self._seq = 0
        self._emitted = 0
        self._orders = 0
        #: order_id -> the order's last state (``data`` of its final postback)
        self.final: dict[str, dict] = {}

    # ------------------------------------------------------------------ public
    def next_messages(self, n: int) -> list[str]:
        """The next ``n`` messages (JSON text), new orders starting as others finish."""
        out: list[str] = []
        while len(out) < n:
            while len(self._live) < self.concurrent:
                self._spawn()
            self._step(out, n)
        return out

    def drain(self) -> list[str]:
        """Every message left: the live orders run to their end, delayed messages arrive."""
        out: list[str] = []
        while self._events:
            self._step(out, None)
        while self._delayed:
            out.append(heapq.heappop(self._delayed)[2])
        return out

    # ------------------------------------------------------------------ delivery
    def _step(self, out: list[str], limit: int | None) -> None:
        while self._delayed and self._delayed[0][0] <= self._emitted:
            out.append(heapq.heappop(self._delayed)[2])
            if limit is not None and len(out) >= limit:
                return
        t, _, oid, data = heapq.heappop(self._events)
        self._clock = max(self._clock, t)
        self._live[oid] -= 1
        if not self._live[oid]:
            del self._live[oid]
        msg = _encoder.encode({"type": "order", "data": data}).decode()
        self._emitted += 1
        r = self._rng
        if r.random() < self.duplicate:
            self._delay(msg, r.randint(0, self.max_delay))
        if r.random() < self.reorder:
            self._delay(msg, r.randint(1, self.max_delay))
        else:
            out.append(msg)

    def _delay(self, msg: str, by: int) -> None:
        self._seq += 1
        heapq.heappush(self._delayed, (self._emitted + by, self._seq, msg))

    # ------------------------------------------------------------------ lifecycles
    def _tick_price(self, ins: SimInstrument) -> Decimal:
        r = self._rng
        p = self._prices[ins.instrument_token] + ins.tick_size * r.randint(-3, 3)
        p = max(p, ins.tick_size)
        self._prices[ins.instrument_token] = p
        return p

    def _spawn(self) -> None:
        r = self._rng
        self._orders += 1
        self._clock += dt.timedelta(seconds=r.randint(0, 3))
        ins = r.choice(self.instruments)
        t = self._clock
        order_id = f"{t:%y%m%d}{self._seed % 1000:03d}{self._orders:06d}"
        kind = r.choices(["MARKET", "LIMIT", "SL", "SL-M"], [40, 45, 10, 5])[0]
        side = r.choice(["BUY", "SELL"])
        qty = r.choice([1, 5, 10, 25, 50, 75, 100, 150, 250, 500])
        tag = None if r.random() < self.untagged or not self.strategies else r.choice(self.strategies)
        ref = self._tick_price(ins)
        off = ins.tick_size * r.randint(1, 10)
        price = Decimal(0) if kind in ("MARKET", "SL-M") else (ref - off if side == "BUY" else ref + off)
        trigger = Decimal(0)
        if kind in ("SL", "SL-M"):
            trigger = ref + off if side == "BUY" else max(ref - off, ins.tick_size)
            if kind == "SL":
                price = trigger
        ts = f"{t:{_TS}}"
        base = {
            "user_id": "AB1234", "unfilled_quantity": 0, "app_id": 1234,
            "checksum": hashlib.sha256(f"{order_id}{ts}simulated-secret".encode()).hexdigest(),
            "placed_by": "AB1234", "order_id": order_id, "exchange_order_id": None,
            "parent_order_id": None, "status": "OPEN", "status_message": None,
            "status_message_raw": None, "order_timestamp": ts, "exchange_update_timestamp": ts,
            "exchange_timestamp": None, "variety": "regular", "exchange": ins.exchange,
            "tradingsymbol": ins.tradingsymbol, "instrument_token": ins.instrument_token,
            "order_type": kind, "transaction_type": side, "validity": "DAY",
            "product": r.choice(["CNC", "MIS", "NRML"]), "quantity": qty,
            "disclosed_quantity": 0, "price": price, "trigger_price": trigger,
            "average_price": Decimal(0), "filled_quantity": 0, "pending_quantity": qty,
            "cancelled_quantity": 0, "market_protection": 0, "meta": {}, "tag": tag,
            "guid": f"{self._seed:x}X{r.getrandbits(40):010x}",
        }
        events: list[dict] = []

        def emit(**changes) -> dict:
            nonlocal t
            if events:
                t = t + dt.timedelta(seconds=r.randint(1, 4))
            st = dict(events[-1] if events else base)
            st.update(changes)
            st["exchange_update_timestamp"] = f"{t:{_TS}}"
            st["unfilled_quantity"] = st["pending_quantity"]
            events.append(st)
            return st

        if r.random() < 0.05:
            emit(status="REJECTED", pending_quantity=0,
                 status_message=f"RMS:Margin Exceeds, Required:{ref * qty}, Available:1000.00 "
                                f"for entity account-AB1234 across exchange across segment "
                                f"across product",
                 status_message_raw="RMS:Margin Exceeds")
        else:
            exch = {"exchange_order_id": f"1{r.getrandbits(48):015d}"[:16],
                    "exchange_timestamp": ts}
            if kind in ("SL", "SL-M"):
                emit(status="TRIGGER PENDING", **exch)
                emit(status="OPEN")
            else:
                emit(status="OPEN", **exch)
            filled, value = 0, Decimal(0)
            cancel = kind in ("LIMIT", "SL") and r.random() < 0.25
            nfills = r.randint(1, 3) if kind in ("MARKET", "SL-M") else r.randint(1, 4)
            if cancel:
                nfills = r.randint(0, 2)
            for k in range(nfills):
                st = events[-1]
                if kind in ("LIMIT", "SL") and r.random() < 0.3:  # a modification first
                    newq = max(st["quantity"] + r.choice([-1, 1]) * r.randint(0, qty // 2 or 1),
                               filled + 1)
                    newp = (st["price"] + ins.tick_size * r.randint(-2, 2)) if st["price"] else st["price"]
                    emit(status="UPDATE", quantity=newq, price=max(newp, ins.tick_size),
                         pending_quantity=newq - filled)
                    st = events[-1]
                left = st["quantity"] - filled
                last = k == nfills - 1 and not cancel
                q = left if last else max(1, min(left - 1, r.randint(1, max(1, left // 2))))
                if q <= 0 or (not last and q >= left):
                    continue
                fill = self._tick_price(ins)
                filled += q
                value += fill * q
                avg = (value / filled).quantize(_AVG_EXP, rounding=ROUND_HALF_UP)
                emit(status="COMPLETE" if last else "UPDATE", filled_quantity=filled,
                     average_price=avg, pending_quantity=st["quantity"] - filled)
            if cancel:
                st = events[-1]
                emit(status="CANCELLED", pending_quantity=0,
                     cancelled_quantity=st["quantity"] - filled,
                     status_message="Cancelled by user" if r.random() < 0.7 else None)
        for st in events:
            when = dt.datetime.strptime(st["exchange_update_timestamp"], _TS).replace(tzinfo=IST)
            self._seq += 1
            heapq.heappush(self._events, (when, self._seq, order_id, st))
        self._live[order_id] = len(events)
        self.final[order_id] = events[-1]


def postback_source(instruments, seed: int = 0):
    """A simulator-server postback source (``ingestor.sim.server.PostbackSource``).

    ``instruments`` are ``ingestor.sim.market.Instrument`` records; indices
    (not tradable) are left out.  Returns ``OrderFlow.next_messages``.
    """
    from decimal import Decimal

    tradable = [(i.instrument_token, i.exchange, i.tradingsymbol,
                 Decimal(i.price) / i.divisor, Decimal(i.tick) / i.divisor)
                for i in instruments if i.segment_code != 9]
    return OrderFlow(tradable, seed).next_messages
