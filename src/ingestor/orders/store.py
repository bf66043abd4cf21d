"""Orders, fills and positions, written transactionally from order postbacks.

:class:`OrderStore` applies a batch of postbacks (raw messages or decoded
:class:`~ingestor.orders.postback.Postback` records) in **one transaction**:

1. Messages that do not decode go to ``postback_dead_letters`` with the reason (and a
   warning in the log): never dropped, never raised.
2. The order is upserted by ``broker_order_id``.  A postback changes the order only if it is
   *newer* than the stored state, compared by the key ``(filled_quantity, terminal status,
   exchange_update_timestamp)``: fills only grow, a terminal status (COMPLETE, CANCELLED,
   REJECTED) outranks a working one at the same fill, and the exchange's update time orders
   the rest.  An order in a terminal status is final.  So the same postback twice changes
   nothing, and an older one delivered late does not move an order back.  Two different
   postbacks with equal keys: the first one applied wins.
3. ``order_history`` gets a row for each status change (a new order's first status too).
4. A fill is derived from each increase of ``filled_quantity``: its quantity is the increase,
   its price is ``(avg1 * filled1 - avg0 * filled0) / (filled1 - filled0)`` with the
   ``average_price`` values as stored (``NUMERIC(18,7)``), in exact decimal arithmetic.
   The division may not terminate, so the price is rounded half-even to
   :data:`DERIVED_PLACES` decimals (sub-nano-paisa; the broker's own averages are rounded
   to far fewer).  Fills go to ``executions``, keyed by ``(order_id, filled_quantity_after)``
   (``ON CONFLICT DO NOTHING``): only fills actually inserted move positions, so positions
   are always a function of ``executions``.
5. Each inserted fill updates the position of (strategy, instrument), average-cost method,
   quantity signed (negative is short) and in the broker's units:

   * same direction (or flat): ``avg = (|Q| * avg + |q| * p) / (|Q| + |q|)`` (rounded like a
     fill price), ``Q += q``;
   * opposite direction: ``realized += min(|q|, |Q|) * (p - avg) * sign(Q)``; reaching zero
     closes the row (``CLOSED``, ``quantity`` 0, ``closed_at`` = the fill's time); going
     through zero closes it and opens a new row for the rest at the fill's price.

   Fills apply in ``executions.id`` order, which is the order they were derived in: within
   a batch, postbacks by exchange update time.  :func:`replay_positions` recomputes them
   from a list of fills (the tests check the table against their own, separate replay).
6. A postback that contradicts what is known of its order is dead-lettered with the reason
   and not applied (it would corrupt fills and positions): one naming another instrument or
   side than the order's first sighting (a SELL of another instrument was applied as a BUY
   fill of the original one), or one whose average price implies a fill at a price of zero
   or below (an average falling from 5 @ 100 to 10 @ 1 made an execution at -98).  What a
   postback says of itself alone (COMPLETE with nothing filled, a fill without an average
   price) is refused when it is decoded (:mod:`ingestor.orders.postback`).
7. The strategy is the order's ``tag`` (:attr:`OrderStore.default_strategy` when absent),
   registered in ``strategies`` if new; unknown instrument tokens are registered in
   ``instruments`` (:func:`ingestor.store.instruments.register_tokens`, committed on its own
   before the batch: ids are shared with the tick writer).

Writers are serialised by a transaction-level advisory lock (:data:`ORDERS_LOCK`): postbacks
are orders per day, not ticks per second, and serialising every read-modify-write of orders
and positions across daemons is what makes them race-free without per-row choreography.
Each step is one set-based statement over ``unnest`` arrays, so a batch costs about eight
round trips whatever its size.

A batch that fails on a database *data* error is retried one postback per transaction, and
those that still fail are dead-lettered with the server's reason, so one poisonous message
cannot block the stream.  What counts as a data error is the writer's classification
(:func:`ingestor.store.errors.classify`): class 22, a not-null or foreign-key violation, an
index row too large (54000).  Everything else propagates -- connection errors (the
transaction rolled back; the caller retries the same batch, it is idempotent) and fatal ones
(a privilege, a unique violation: the writer stops and keeps the batch).

The logic is written once, free of I/O (a generator that yields statements); :class:`OrderStore`
drives it on a :class:`psycopg.AsyncConnection` (:meth:`OrderStore.apply`) or a
:class:`psycopg.Connection` (:meth:`OrderStore.apply_sync`).

Mark to market: :func:`mark_to_market` sets ``current_price`` and ``unrealized_pnl =
quantity * (current_price - average_entry_price)`` of the open positions of the given
instruments in one statement; :func:`mark_from_ticks` does it from the latest ``tick_data``
price of every instrument held, also in one statement.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import logging
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generator, Iterable, Mapping, Sequence

from ingestor.orders.postback import (
    TERMINAL_STATUSES,
    Postback,
    PostbackError,
    decode_message,
    encode_postback,
)

log = logging.getLogger(__name__)

__all__ = [
    "DERIVED_PLACES",
    "DEFAULT_STRATEGY",
    "ORDERS_LOCK",
    "ApplyResult",
    "Fill",
    "OrderStore",
    "PositionRow",
    "derive_fill_price",
    "mark_to_market",
    "amark_to_market",
    "mark_from_ticks",
    "amark_from_ticks",
    "mark_to_market_loop",
    "replay_positions",
]

#: Decimal places of derived values (fill prices, average entry prices).
DERIVED_PLACES = 12
#: Strategy of orders without a tag.
DEFAULT_STRATEGY = "default"
#: Transaction-level advisory lock serialising postback writers ("ingestor" + 2; +0 is the
#: migration lock, +1 the instruments dump load).
ORDERS_LOCK = int.from_bytes(b"ingestor", "big") + 2

_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
_DERIVED_EXP = Decimal(1).scaleb(-DERIVED_PLACES)
_PRICE_EXP = Decimal("1e-7")
_MIN_TIME = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------------------------
# exact arithmetic


def _tidy(d: Decimal) -> Decimal:
    """Drop trailing fractional zeros (``100.050000`` -> ``100.05``), never to an exponent."""
    n = d.normalize(_CTX)
    if n.as_tuple().exponent > 0:
        n = n.quantize(Decimal(1), context=_CTX)
    return n


def _derived(x: Decimal) -> Decimal:
    return _tidy(x.quantize(_DERIVED_EXP, context=_CTX))


def _price7(x: Decimal | None) -> Decimal | None:
    """A price as ``NUMERIC(18,7)`` stores it (PostgreSQL rounds half away from zero)."""
    if x is None:
        return None
    return x.quantize(_PRICE_EXP, rounding=decimal.ROUND_HALF_UP, context=_CTX)


def derive_fill_price(avg0: Decimal, filled0: int, avg1: Decimal, filled1: int) -> Decimal:
    """Price of the fill that took an order from ``filled0`` at ``avg0`` to ``filled1`` at ``avg1``.

    ``(avg1 * filled1 - avg0 * filled0) / (filled1 - filled0)``, exact, then rounded half-even
    to :data:`DERIVED_PLACES` decimals.
    """
    q = filled1 - filled0
    if q <= 0:
        raise ValueError("a fill needs filled1 > filled0")
    num = _CTX.subtract(_CTX.multiply(avg1, filled1), _CTX.multiply(avg0, filled0))
    return _derived(_CTX.divide(num, q))


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


@dataclass
class Fill:
    """A fill derived from a postback (one ``executions`` row)."""

    order_id: uuid.UUID
    strategy_id: str
    instrument_id: int
    transaction_type: str
    quantity: int
    price: Decimal
    time: dt.datetime
    filled_quantity_after: int

    @property
    def signed_quantity(self) -> int:
        return self.quantity if self.transaction_type == "BUY" else -self.quantity


@dataclass
class PositionRow:
    """A ``positions`` row as the store computes it."""

    id: int | None
    strategy_id: str
    instrument_id: int
    quantity: int
    average_entry_price: Decimal
    realized_pnl: Decimal
    current_price: Decimal | None
    opened_at: dt.datetime | None
    closed_at: dt.datetime | None = None
    dirty: bool = False

    @property
    def status(self) -> str:
        return "OPEN" if self.quantity != 0 else "CLOSED"

    @property
    def unrealized_pnl(self) -> Decimal | None:
        if self.quantity == 0:
            return Decimal(0)
        if self.current_price is None:
            return None
        return _CTX.multiply(self.quantity, _CTX.subtract(self.current_price,
                                                            self.average_entry_price))


def apply_fill(rows: list[PositionRow], strategy_id: str, instrument_id: int, q: int,
               price: Decimal, time: dt.datetime) -> None:
    """Apply one signed fill to the rows of one (strategy, instrument), average-cost method.

    ``rows`` is the pair's rows in order; only the last may be open.  Changed rows are
    marked ``dirty``; new rows are appended (``id`` None).
    """
    cur = rows[-1] if rows and rows[-1].quantity != 0 else None
    if cur is None:
        mark = rows[-1].current_price if rows else None
        rows.append(PositionRow(None, strategy_id, instrument_id, q, price, Decimal(0), mark,
                                time, dirty=True))
        return
    Q, A = cur.quantity, cur.average_entry_price
    cur.dirty = True
    if _sign(q) == _sign(Q):
        total = abs(Q) + abs(q)
        cur.average_entry_price = _derived(_CTX.divide(
            _CTX.add(_CTX.multiply(abs(Q), A), _CTX.multiply(abs(q), price)), total))
        cur.quantity = Q + q
        return
    closing = min(abs(q), abs(Q))
    cur.realized_pnl = _CTX.add(cur.realized_pnl,
                                _CTX.multiply(closing * _sign(Q), _CTX.subtract(price, A)))
    rest = Q + q
    if rest == 0 or _sign(rest) != _sign(Q):
        cur.quantity = 0
        cur.closed_at = time
        if rest != 0:
            rows.append(PositionRow(None, strategy_id, instrument_id, rest, price, Decimal(0),
                                    cur.current_price, time, dirty=True))
    else:
        cur.quantity = rest


def replay_positions(fills: Iterable[Fill]) -> dict[tuple[str, int], list[PositionRow]]:
    """Positions recomputed from fills in order (``executions`` by ``id``), from nothing."""
    out: dict[tuple[str, int], list[PositionRow]] = {}
    for f in fills:
        rows = out.setdefault((f.strategy_id, f.instrument_id), [])
        apply_fill(rows, f.strategy_id, f.instrument_id, f.signed_quantity, f.price, f.time)
    return out


# --------------------------------------------------------------------------------------------
# results


@dataclass
class ApplyResult:
    """What one :meth:`OrderStore.apply` call did."""

    received: int = 0
    applied: int = 0           # postbacks that changed an order
    stale: int = 0             # duplicates, older than stored, or after a terminal status
    dead_letters: int = 0
    orders_inserted: int = 0
    orders_updated: int = 0
    history: int = 0
    executions: int = 0
    positions_opened: int = 0
    positions_closed: int = 0
    reasons: list[str] = field(default_factory=list)  # of the dead letters, in order

    def add(self, other: "ApplyResult") -> None:
        for f in dataclasses.fields(self):
            if f.name == "reasons":
                self.reasons.extend(other.reasons)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# --------------------------------------------------------------------------------------------
# SQL

_LOCK = "SELECT pg_advisory_xact_lock(%s)"

_DEAD = """
INSERT INTO postback_dead_letters (stream, seq, reason, payload)
SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[])
ON CONFLICT (stream, seq) WHERE stream IS NOT NULL AND seq IS NOT NULL DO NOTHING
"""

_STRATEGIES = """
INSERT INTO strategies (id, name, description)
SELECT s, s, 'registered automatically from an order tag' FROM unnest(%s::text[]) AS s
ON CONFLICT (id) DO NOTHING
"""

_ORDERS_OF = """
SELECT id, broker_order_id, strategy_id, instrument_id, transaction_type, filled_quantity,
       average_price, current_status, exchange_update_timestamp
  FROM orders WHERE broker_order_id = ANY(%s::text[])
"""

_ORDER_COLS = [
    ("id", "uuid"), ("broker_order_id", "text"), ("exchange_order_id", "text"),
    ("parent_order_id", "text"), ("strategy_id", "text"), ("instrument_id", "integer"),
    ("exchange", "text"), ("tradingsymbol", "text"), ("transaction_type", "text"),
    ("order_type", "text"), ("product", "text"), ("variety", "text"), ("validity", "text"),
    ("quantity", "bigint"), ("disclosed_quantity", "bigint"), ("price", "numeric"),
    ("trigger_price", "numeric"), ("filled_quantity", "bigint"), ("pending_quantity", "bigint"),
    ("cancelled_quantity", "bigint"), ("average_price", "numeric"), ("current_status", "text"),
    ("status_message", "text"), ("tag", "text"), ("placed_by", "text"),
    ("order_timestamp", "timestamptz"), ("exchange_update_timestamp", "timestamptz"),
    ("exchange_timestamp", "timestamptz"), ("last_postback", "text"),
    ("executed_at", "timestamptz"), ("cancelled_at", "timestamptz"),
]
# the first sighting fixes these: a later postback cannot move an order to another strategy,
# instrument or side (positions were built on them)
_ORDER_FIXED = {"id", "broker_order_id", "strategy_id", "instrument_id", "transaction_type"}

_UPSERT_ORDERS = (
    "INSERT INTO orders AS o ({cols})\nSELECT {sel}\n  FROM unnest({arrs}) AS t ({cols})\n"
    "ON CONFLICT (broker_order_id) DO UPDATE SET {sets}, updated_at = now()\n"
    "RETURNING (xmax = 0) AS inserted"
).format(
    cols=", ".join(c for c, _ in _ORDER_COLS),
    sel=", ".join(f"t.{c}::jsonb" if c == "last_postback" else f"t.{c}" for c, _ in _ORDER_COLS),
    arrs=", ".join(f"%s::{t}[]" for _, t in _ORDER_COLS),
    sets=", ".join(
        f"{c} = coalesce(o.{c}, excluded.{c})" if c in ("executed_at", "cancelled_at")
        else f"{c} = excluded.{c}"
        for c, _ in _ORDER_COLS if c not in _ORDER_FIXED),
)

_HISTORY = """
INSERT INTO order_history (order_id, status, "timestamp", filled_quantity, average_price, details)
SELECT o, s, coalesce(t, now()), f, a, d::jsonb
  FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::bigint[], %s::numeric[], %s::text[])
       WITH ORDINALITY AS u (o, s, t, f, a, d, n)
 ORDER BY n
"""

_EXECUTIONS = """
INSERT INTO executions (order_id, strategy_id, instrument_id, transaction_type, quantity, price,
                        time, filled_quantity_after)
SELECT o, s, i, tt, q, p, t, fa
  FROM unnest(%s::uuid[], %s::text[], %s::integer[], %s::text[], %s::bigint[], %s::numeric[],
              %s::timestamptz[], %s::bigint[]) WITH ORDINALITY AS u (o, s, i, tt, q, p, t, fa, n)
 ORDER BY n
ON CONFLICT (order_id, filled_quantity_after) DO NOTHING
RETURNING order_id, filled_quantity_after
"""

_OPEN_POSITIONS = """
SELECT p.id, p.strategy_id, p.instrument_id, p.quantity, p.average_entry_price,
       p.realized_pnl, p.current_price, p.opened_at
  FROM positions p
  JOIN unnest(%s::text[], %s::integer[]) AS k (s, i) ON p.strategy_id = k.s AND p.instrument_id = k.i
 WHERE p.status = 'OPEN'
"""

_UPDATE_POSITIONS = """
UPDATE positions p
   SET quantity = u.q, average_entry_price = u.a, realized_pnl = u.r, unrealized_pnl = u.un,
       status = CASE WHEN u.q <> 0 THEN 'OPEN' ELSE 'CLOSED' END, closed_at = u.c,
       updated_at = now()
  FROM unnest(%s::bigint[], %s::bigint[], %s::numeric[], %s::numeric[], %s::numeric[],
              %s::timestamptz[]) AS u (id, q, a, r, un, c)
 WHERE p.id = u.id
"""

_INSERT_POSITIONS = """
INSERT INTO positions (strategy_id, instrument_id, quantity, average_entry_price, current_price,
                       unrealized_pnl, realized_pnl, status, opened_at, closed_at)
SELECT s, i, q, a, cp, un, r, CASE WHEN q <> 0 THEN 'OPEN' ELSE 'CLOSED' END, coalesce(o, now()), c
  FROM unnest(%s::text[], %s::integer[], %s::bigint[], %s::numeric[], %s::numeric[],
              %s::numeric[], %s::numeric[], %s::timestamptz[], %s::timestamptz[])
       WITH ORDINALITY AS u (s, i, q, a, cp, un, r, o, c, n)
 ORDER BY n
"""


def _fk_violation():
    import psycopg

    return psycopg.errors.ForeignKeyViolation


class _Q:
    """A statement the I/O-free logic asks its driver to run."""

    __slots__ = ("sql", "params", "fetch")

    def __init__(self, sql: str, params: Sequence[Any] = (), fetch: bool = False):
        self.sql = sql
        self.params = params
        self.fetch = fetch


# --------------------------------------------------------------------------------------------
# the store


@dataclass
class _Order:
    id: uuid.UUID
    strategy_id: str
    instrument_id: int
    transaction_type: str
    filled: int
    avg: Decimal
    status: str
    ts: dt.datetime | None
    new: bool = False
    pb: Postback | None = None
    data: str | None = None

    def key(self):
        return (self.filled, self.status in TERMINAL_STATUSES, self.ts or _MIN_TIME)


def _key(pb: Postback):
    return (pb.filled_quantity, pb.status in TERMINAL_STATUSES,
            pb.exchange_update_timestamp or _MIN_TIME)


def _contradicts_identity(pb: Postback, st: _Order, ids: Mapping[int, int]) -> str | None:
    """Why ``pb`` cannot be a postback of the stored order ``st`` (None: it can)."""
    iid = ids.get(pb.instrument_token)
    if iid != st.instrument_id:
        return (f"names instrument_token {pb.instrument_token} but order {pb.order_id} is of "
                f"instrument id {st.instrument_id}")
    if pb.transaction_type != st.transaction_type:
        return (f"names side {pb.transaction_type} but order {pb.order_id} is a "
                f"{st.transaction_type}")
    return None


def _contradiction(pb: Postback, data: str, place, reason: str, res: "ApplyResult") -> tuple:
    """A dead letter for a postback that contradicts its order (counted in ``res``)."""
    reason = f"contradicts its order: {reason}"[:1000]
    log.warning("postback of order %s dead-lettered%s: %s", pb.order_id[:64],
                f" ({place[0]}#{place[1]})" if place else "", reason)
    res.dead_letters += 1
    res.reasons.append(reason)
    return (place[0] if place else None, place[1] if place else None, reason,
            _payload_text(data))


def _fill_time(pb: Postback) -> dt.datetime:
    return (pb.exchange_update_timestamp or pb.exchange_timestamp or pb.order_timestamp
            or dt.datetime.now(dt.timezone.utc))


def _payload_text(raw: Any) -> str:
    if isinstance(raw, Postback):
        text = encode_postback(raw).decode()
    elif isinstance(raw, str):
        text = raw
    else:
        text = bytes(raw).decode("utf-8", "backslashreplace")
    # PostgreSQL text cannot hold NUL
    return text.replace("\x00", "\\x00")


Message = Any  # bytes | str | Postback


class OrderStore:
    """Applies order postbacks to ``orders``, ``order_history``, ``executions``, ``positions``.

    Parameters
    ----------
    default_strategy : str
        Strategy of orders without a tag (registered in ``strategies`` on first use).

    Notes
    -----
    One store per daemon; it caches instrument ids (rows of ``instruments`` are never
    deleted; a batch refused by a foreign key is retried once with the cache reloaded).
    Not safe to share between
    concurrent tasks: give each writer its own store and connection (the advisory lock
    serialises them in the database).
    """

    def __init__(self, default_strategy: str = DEFAULT_STRATEGY):
        self.default_strategy = default_strategy
        self._ids: dict[int, int] = {}
        #: what the last :meth:`apply` / :meth:`apply_sync` did (the daemon counts its dead
        #: letters once the batch's transaction committed)
        self.last_result: ApplyResult | None = None

    # ------------------------------------------------------------------ decoding
    def _decode(self, messages: Sequence[Message], places) -> tuple[list, list, ApplyResult]:
        # (the places of the good ones are kept in self._good_places, in the same order: a
        # postback the database refuses later is dead-lettered at its place too)
        res = ApplyResult(received=len(messages))
        good: list[tuple[Postback, str]] = []
        good_places: list = []
        dead: list[tuple[str | None, int | None, str, str]] = []
        if places is not None and len(places) != len(messages):
            raise ValueError("places must be as long as messages")
        for k, raw in enumerate(messages):
            place = places[k] if places is not None else None
            try:
                if isinstance(raw, Postback):
                    pb, data = raw, encode_postback(raw).decode()
                else:
                    pb, b = decode_message(raw)
                    data = b.decode("utf-8")
                if "\\u0000" in data:
                    raise PostbackError("contains an escaped NUL character, which PostgreSQL "
                                        "text cannot hold")
            except Exception as exc:  # noqa: BLE001 - never raised: kept with the reason
                reason = (str(exc) if isinstance(exc, (PostbackError, UnicodeDecodeError))
                          else f"cannot decode: {type(exc).__name__}: {exc}")[:1000]
                log.warning("postback dead-lettered%s: %s",
                            f" ({place[0]}#{place[1]})" if place else "", reason)
                dead.append((place[0] if place else None, place[1] if place else None,
                             reason, _payload_text(raw)))
                res.reasons.append(reason)
                continue
            good.append((pb, data))
            good_places.append(place)
        res.dead_letters = len(dead)
        self._good_places = good_places
        return good, dead, res

    def _strategy_of(self, pb: Postback) -> str:
        return pb.strategy_tag or self.default_strategy

    # ------------------------------------------------------------------ the logic (no I/O)
    def _batch(self, good: list[tuple[Postback, str]], dead: list, ids: Mapping[int, int],
               res: ApplyResult, places: Sequence | None = None) -> Generator[_Q, Any, None]:
        yield _Q(_LOCK, (ORDERS_LOCK,))
        if dead:
            yield _Q(_DEAD, tuple(map(list, zip(*dead))))
        if not good:
            return
        # every batch (a handful of keys, one statement): a cache of registered strategies
        # would go stale if a row were deleted, and then refuse every postback of it
        yield _Q(_STRATEGIES, (sorted({self._strategy_of(pb) for pb, _ in good}),))
        broker_ids = sorted({pb.order_id for pb, _ in good})
        rows = yield _Q(_ORDERS_OF, (broker_ids,), fetch=True)
        orders: dict[str, _Order] = {}
        for oid, boid, sid, iid, tt, filled, avg, status, ts in rows:
            orders[boid] = _Order(oid, sid, iid, tt, filled, avg or Decimal(0), status, ts)

        # apply in exchange-time order (stable: delivery order among equals)
        items = sorted(zip(good, places if places is not None else [None] * len(good)),
                       key=lambda g: (g[0][0].exchange_update_timestamp or _MIN_TIME,
                                      g[0][0].filled_quantity, g[0][0].is_terminal))
        changed: dict[str, _Order] = {}
        history: list[tuple] = []
        fills: list[Fill] = []
        contradicting: list[tuple] = []
        for (pb, data), place in items:
            st = orders.get(pb.order_id)
            if st is not None and (reason := _contradicts_identity(pb, st, ids)):
                contradicting.append(_contradiction(pb, data, place, reason, res))
                continue
            if st is not None and (st.status in TERMINAL_STATUSES or _key(pb) <= st.key()):
                res.stale += 1
                continue
            avg1 = _price7(pb.average_price) or Decimal(0)
            fill_price = None
            if pb.filled_quantity > (st.filled if st is not None else 0):
                filled0, avg0 = (st.filled, st.avg) if st is not None else (0, Decimal(0))
                fill_price = derive_fill_price(avg0, filled0, avg1, pb.filled_quantity)
                if fill_price <= 0:
                    reason = (f"average_price {avg1} at filled_quantity {pb.filled_quantity} "
                              f"after {avg0} at {filled0} implies a fill of "
                              f"{pb.filled_quantity - filled0} at {fill_price}")
                    contradicting.append(_contradiction(pb, data, place, reason, res))
                    continue
            res.applied += 1
            if st is None:
                st = _Order(uuid.uuid4(), self._strategy_of(pb), ids[pb.instrument_token],
                            pb.transaction_type, 0, Decimal(0), "", None, new=True)
                orders[pb.order_id] = st
            if fill_price is not None:
                fills.append(Fill(
                    st.id, st.strategy_id, st.instrument_id, st.transaction_type,
                    pb.filled_quantity - st.filled, fill_price, _fill_time(pb),
                    pb.filled_quantity))
            if pb.status != st.status:
                history.append((st.id, pb.status, pb.exchange_update_timestamp or pb.order_timestamp,
                                pb.filled_quantity, avg1,
                                json.dumps({k: v for k, v in (
                                    ("status_message", pb.status_message),
                                    ("quantity", pb.quantity),
                                    ("price", str(pb.price) if pb.price is not None else None))
                                    if v is not None})))
            st.filled, st.avg, st.status = pb.filled_quantity, avg1, pb.status
            st.ts = pb.exchange_update_timestamp or st.ts
            st.pb, st.data = pb, data
            changed[pb.order_id] = st

        if contradicting:
            yield _Q(_DEAD, tuple(map(list, zip(*contradicting))))
        if changed:
            yield from self._write_orders(list(changed.values()), res)
        if history:
            yield _Q(_HISTORY, tuple(map(list, zip(*history))))
            res.history += len(history)
        if not fills:
            return
        inserted = yield _Q(_EXECUTIONS, (
            [f.order_id for f in fills], [f.strategy_id for f in fills],
            [f.instrument_id for f in fills], [f.transaction_type for f in fills],
            [f.quantity for f in fills], [f.price for f in fills], [f.time for f in fills],
            [f.filled_quantity_after for f in fills]), fetch=True)
        done = {(o, fa) for o, fa in inserted}
        if len(done) != len(fills):
            log.error("%d derived fill(s) already in executions: skipped (positions follow "
                      "executions)", len(fills) - len(done))
        fills = [f for f in fills if (f.order_id, f.filled_quantity_after) in done]
        res.executions += len(fills)
        if fills:
            yield from self._write_positions(fills, res)

    def _write_orders(self, sts: list[_Order], res: ApplyResult):
        cols: dict[str, list] = {c: [] for c, _ in _ORDER_COLS}
        for st in sts:
            pb = st.pb
            done_at = _fill_time(pb)
            row = {
                "id": st.id, "broker_order_id": pb.order_id,
                "exchange_order_id": pb.exchange_order_id, "parent_order_id": pb.parent_order_id,
                "strategy_id": st.strategy_id, "instrument_id": st.instrument_id,
                "exchange": pb.exchange, "tradingsymbol": pb.tradingsymbol,
                "transaction_type": st.transaction_type, "order_type": pb.order_type,
                "product": pb.product, "variety": pb.variety, "validity": pb.validity,
                "quantity": pb.quantity, "disclosed_quantity": pb.disclosed_quantity,
                "price": _price7(pb.price), "trigger_price": _price7(pb.trigger_price),
                "filled_quantity": pb.filled_quantity, "pending_quantity": pb.pending_quantity,
                "cancelled_quantity": pb.cancelled_quantity, "average_price": st.avg,
                "current_status": pb.status, "status_message": pb.status_message,
                "tag": pb.strategy_tag, "placed_by": pb.placed_by,
                "order_timestamp": pb.order_timestamp,
                "exchange_update_timestamp": pb.exchange_update_timestamp,
                "exchange_timestamp": pb.exchange_timestamp, "last_postback": st.data,
                "executed_at": done_at if pb.status == "COMPLETE" else None,
                "cancelled_at": done_at if pb.status == "CANCELLED" else None,
            }
            for c in cols:
                cols[c].append(row[c])
        flags = yield _Q(_UPSERT_ORDERS, tuple(cols.values()), fetch=True)
        ins = sum(1 for (f,) in flags if f)
        res.orders_inserted += ins
        res.orders_updated += len(flags) - ins

    def _write_positions(self, fills: list[Fill], res: ApplyResult):
        pairs = sorted({(f.strategy_id, f.instrument_id) for f in fills})
        rows = yield _Q(_OPEN_POSITIONS, ([s for s, _ in pairs], [i for _, i in pairs]),
                        fetch=True)
        book: dict[tuple[str, int], list[PositionRow]] = {p: [] for p in pairs}
        for pid, sid, iid, q, a, r, cp, opened in rows:
            book[(sid, iid)].append(PositionRow(pid, sid, iid, q, a, r, cp, opened))
        for f in fills:
            apply_fill(book[(f.strategy_id, f.instrument_id)], f.strategy_id, f.instrument_id,
                       f.signed_quantity, f.price, f.time)
        upd = [r for rs in book.values() for r in rs if r.id is not None and r.dirty]
        new = [r for rs in book.values() for r in rs if r.id is None]
        res.positions_opened += len(new)
        res.positions_closed += sum(1 for r in upd + new if r.quantity == 0)
        if upd:  # first: closing a row frees the pair's open slot for a new row
            yield _Q(_UPDATE_POSITIONS, (
                [r.id for r in upd], [r.quantity for r in upd],
                [r.average_entry_price for r in upd], [r.realized_pnl for r in upd],
                [r.unrealized_pnl for r in upd], [r.closed_at for r in upd]))
        if new:
            yield _Q(_INSERT_POSITIONS, (
                [r.strategy_id for r in new], [r.instrument_id for r in new],
                [r.quantity for r in new], [r.average_entry_price for r in new],
                [r.current_price for r in new], [r.unrealized_pnl for r in new],
                [r.realized_pnl for r in new], [r.opened_at for r in new],
                [r.closed_at for r in new]))

    # ------------------------------------------------------------------ drivers
    @staticmethod
    def _is_data_error(exc: BaseException) -> bool:
        # a value the schema refuses: the message, not the connection or the setup, is bad
        from ingestor.store.errors import classify

        return classify(exc) == "data"

    @staticmethod
    def _refusal(exc: BaseException, item, place=None) -> tuple:
        from ingestor.store.errors import describe_error

        reason = f"refused by the database: {describe_error(exc)}"[:1000]
        pb, data = item
        log.warning("postback of order %s dead-lettered: %s", pb.order_id, reason)
        return (place[0] if place else None, place[1] if place else None, reason,
                _payload_text(data))

    def apply_sync(self, conn, messages: Sequence[Message],
                   places: Sequence[tuple[str, int] | None] | None = None) -> ApplyResult:
        """Synchronous twin of :meth:`apply` (a :class:`psycopg.Connection`)."""
        self.last_result = None
        self.last_result = res = self._apply_sync(conn, messages, places)
        return res

    def _apply_sync(self, conn, messages, places, _retry: bool = True) -> ApplyResult:
        from ingestor.store.instruments import register_tokens

        good, dead, res = self._decode(messages, places)
        unknown = {pb.instrument_token for pb, _ in good} - self._ids.keys()
        if unknown:
            self._ids.update(register_tokens(conn, unknown))
        try:
            self._run_sync(conn, good, dead, res, self._good_places)
        except Exception as exc:
            if not self._is_data_error(exc):
                raise
            if _retry and isinstance(exc, _fk_violation()):
                # perhaps our instrument ids are stale: reload them and try the batch again
                self._ids.clear()
                return self._apply_sync(conn, messages, places, _retry=False)
            log.warning("postback batch refused by the database (%s): one by one", exc)
            total = ApplyResult(received=res.received)
            if dead:
                r = ApplyResult(dead_letters=len(dead), reasons=[d[2] for d in dead])
                self._run_sync(conn, [], dead, r)
                total.add(r)
            for item, place in zip(good, self._good_places):
                r = ApplyResult()
                try:
                    self._run_sync(conn, [item], [], r, [place])
                except Exception as exc1:
                    if not self._is_data_error(exc1):
                        raise
                    letter = self._refusal(exc1, item, place)
                    r = ApplyResult(dead_letters=1, reasons=[letter[2]])
                    self._run_sync(conn, [], [letter], ApplyResult())
                total.add(r)
            return total
        return res

    def _run_sync(self, conn, good, dead, res, places=None) -> None:
        with conn.transaction():
            gen = self._batch(good, dead, self._ids, res, places)
            try:
                q = next(gen)
                while True:
                    cur = conn.execute(q.sql, q.params)
                    q = gen.send(cur.fetchall() if q.fetch else cur.rowcount)
            except StopIteration:
                pass

    async def apply(self, conn, messages: Sequence[Message],
                    places: Sequence[tuple[str, int] | None] | None = None) -> ApplyResult:
        """Apply a batch of postbacks in one transaction.

        Parameters
        ----------
        conn : psycopg.AsyncConnection
            Idle (the store commits), or inside the caller's transaction (a savepoint).
        messages : sequence
            Raw WebSocket text messages / HTTP bodies (``bytes`` or ``str``; envelope or bare
            ``data``), or decoded :class:`Postback` records.
        places : sequence of (stream, seq), optional
            Each message's place in its stream: a dead letter replayed from the same place
            is not stored twice.

        Returns
        -------
        ApplyResult

        Raises
        ------
        psycopg.OperationalError
            The connection failed: nothing of the batch was committed; retry the same batch
            on a new connection (it is idempotent).
        """
        self.last_result = None
        self.last_result = res = await self._apply(conn, messages, places)
        return res

    async def _apply(self, conn, messages, places, _retry: bool = True) -> ApplyResult:
        from ingestor.store.instruments import aregister_tokens

        good, dead, res = self._decode(messages, places)
        unknown = {pb.instrument_token for pb, _ in good} - self._ids.keys()
        if unknown:
            self._ids.update(await aregister_tokens(conn, unknown))
        try:
            await self._run_async(conn, good, dead, res, self._good_places)
        except Exception as exc:
            if not self._is_data_error(exc):
                raise
            if _retry and isinstance(exc, _fk_violation()):
                # perhaps our instrument ids are stale: reload them and try the batch again
                self._ids.clear()
                return await self._apply(conn, messages, places, _retry=False)
            log.warning("postback batch refused by the database (%s): one by one", exc)
            total = ApplyResult(received=res.received)
            if dead:
                r = ApplyResult(dead_letters=len(dead), reasons=[d[2] for d in dead])
                await self._run_async(conn, [], dead, r)
                total.add(r)
            for item, place in zip(good, self._good_places):
                r = ApplyResult()
                try:
                    await self._run_async(conn, [item], [], r, [place])
                except Exception as exc1:
                    if not self._is_data_error(exc1):
                        raise
                    letter = self._refusal(exc1, item, place)
                    r = ApplyResult(dead_letters=1, reasons=[letter[2]])
                    await self._run_async(conn, [], [letter], ApplyResult())
                total.add(r)
            return total
        return res

    async def _run_async(self, conn, good, dead, res, places=None) -> None:
        async with conn.transaction():
            gen = self._batch(good, dead, self._ids, res, places)
            try:
                q = next(gen)
                while True:
                    cur = await conn.execute(q.sql, q.params)
                    q = gen.send(await cur.fetchall() if q.fetch else cur.rowcount)
            except StopIteration:
                pass


# --------------------------------------------------------------------------------------------
# mark to market

_MARK = """
UPDATE positions p
   SET current_price = u.price,
       unrealized_pnl = p.quantity * (u.price - p.average_entry_price),
       updated_at = now()
  FROM unnest(%s::integer[], %s::numeric[]) AS u (instrument_id, price)
 WHERE p.instrument_id = u.instrument_id AND p.status = 'OPEN'
   AND p.current_price IS DISTINCT FROM u.price
"""

# the latest tick of each instrument held (the (instrument_id, time) key serves the LIMIT 1)
_MARK_FROM_TICKS = """
UPDATE positions p
   SET current_price = l.price,
       unrealized_pnl = p.quantity * (l.price - p.average_entry_price),
       updated_at = now()
  FROM (SELECT h.instrument_id, t.price
          FROM (SELECT DISTINCT instrument_id FROM positions WHERE status = 'OPEN') h
          CROSS JOIN LATERAL (SELECT price FROM tick_data d
                               WHERE d.instrument_id = h.instrument_id
                               ORDER BY d.time DESC LIMIT 1) t) l
 WHERE p.instrument_id = l.instrument_id AND p.status = 'OPEN'
   AND p.current_price IS DISTINCT FROM l.price
"""


def _price_arrays(prices) -> tuple[list[int], list[Decimal]]:
    if isinstance(prices, Mapping):
        ids, values = list(prices.keys()), list(prices.values())
    else:
        ids, values = prices
        ids, values = list(ids), list(values)
    if len(ids) != len(values):
        raise ValueError("instrument ids and prices differ in length")
    out = []
    for v in values:
        if isinstance(v, float):
            raise TypeError("prices must be exact (Decimal, int or str), not float")
        out.append(v if isinstance(v, Decimal) else Decimal(str(v)))
    return [int(i) for i in ids], out


def mark_to_market(conn, prices) -> int:
    """Mark the open positions of the given instruments to market, in one statement.

    Parameters
    ----------
    conn : psycopg.Connection
    prices : mapping or (ids, prices)
        ``{instrument_id: price}``, or two equal-length sequences (numpy arrays welcome for
        the ids); prices exact (``Decimal``, ``int`` or ``str``), never ``float``.

    Returns
    -------
    int
        Positions updated (those whose price changed).
    """
    ids, values = _price_arrays(prices)
    if not ids:
        return 0
    return conn.execute(_MARK, (ids, values)).rowcount


async def amark_to_market(conn, prices) -> int:
    """Async twin of :func:`mark_to_market`."""
    ids, values = _price_arrays(prices)
    if not ids:
        return 0
    cur = await conn.execute(_MARK, (ids, values))
    return cur.rowcount


def mark_from_ticks(conn) -> int:
    """Mark every open position to its instrument's latest ``tick_data`` price (one statement)."""
    return conn.execute(_MARK_FROM_TICKS).rowcount


async def amark_from_ticks(conn) -> int:
    """Async twin of :func:`mark_from_ticks`; the daemon calls it at its cadence (1 s)."""
    cur = await conn.execute(_MARK_FROM_TICKS)
    return cur.rowcount


async def mark_to_market_loop(conn, interval: float = 1.0, stop=None) -> None:
    """Mark positions from the latest ticks every ``interval`` seconds until ``stop`` is set.

    One statement per cadence (:func:`amark_from_ticks`), each committed on its own.

    Parameters
    ----------
    conn : psycopg.AsyncConnection
        A connection of its own (autocommit is fine).
    interval : float
        Seconds between marks (the daemon's default cadence is 1 s).
    stop : asyncio.Event, optional
        Ends the loop when set; without one the loop runs until cancelled.
    """
    import asyncio

    while stop is None or not stop.is_set():
        async with conn.transaction():
            await amark_from_ticks(conn)
        if stop is None:
            await asyncio.sleep(interval)
        else:
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
