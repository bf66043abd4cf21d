"""Kite order postbacks decoded into typed, validated records.

Kite sends an order update as a WebSocket text message ``{"type": "order", "data": {...}}``
whose ``data`` has the structure of the HTTP postback (Kite Connect v3 docs, "Postbacks";
the official sample is zerodha/kiteconnect-mocks ``postback.json``).  :func:`decode_postback`
turns either form (the envelope, or the bare ``data`` object) into a :class:`Postback`:

* **Every documented field** is a typed attribute; fields the official Go client also accepts
  (``account_id``, ``modified``, ``validity_ttl``, ``auction_number``, ``tags``) too.  Unknown
  extra keys are tolerated (ignored), and the documented optional fields may be missing or
  null: the broker's key set changes over time, and a postback the daemon refuses is a
  postback a strategy never sees.
* **Exact prices.**  ``price``, ``trigger_price``, ``average_price`` are :class:`~decimal.Decimal`
  parsed from the JSON number's text, never through a float.
* **Timestamps** are ``"YYYY-MM-DD HH:MM:SS"`` without a zone; the exchange's clock is
  India's, so a zone-less timestamp is read as Asia/Kolkata (fixed UTC+05:30: India has no
  daylight saving).  An explicit offset, if one ever appears, is honoured.
* **Validated** where a bad value would corrupt what the store derives from it:
  ``transaction_type`` is BUY/SELL (the sign of a position), ``order_type`` is one of
  MARKET/LIMIT/SL/SL-M, quantities are non-negative with ``filled_quantity <= quantity``,
  prices are finite, non-negative and fit ``NUMERIC(18,7)``, no text holds a NUL character
  (PostgreSQL text cannot), a COMPLETE order has filled something and a fill has an average
  price (the store checks the rest against what it knows of the order: see
  :mod:`ingestor.orders.store`).  Anything else raises :class:`PostbackError` with the reason;
  the store keeps such messages in ``postback_dead_letters``.
* **Bounded**, because one hostile message must not stop the writer: a message over
  :data:`MAX_BYTES` or nested deeper than :data:`MAX_DEPTH` is refused before it is parsed
  (a postback nested a thousand levels deep made the parser raise ``RecursionError``, which
  escaped the handler); identifiers (``order_id``, ``exchange_order_id``, ``tag``,
  ``tradingsymbol``, ...) are at most :data:`MAX_ID` characters and free texts
  :data:`MAX_TEXT` (PostgreSQL refuses an index row over ~2.7 kB: an over-long
  ``order_id`` would fail the whole batch); ``instrument_token`` is in ``1 .. 2**32 - 1``
  (Kite's tokens are unsigned 32-bit); timestamps lie between :data:`MIN_TIME` and
  :data:`MAX_FUTURE` from now (a year-1 timestamp used to be stored as 1 BC and break every
  later fill of the order).  :func:`decode_message` never raises anything but
  :class:`PostbackError`.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
import re
from typing import Annotated, Any, Literal, Union

import msgspec

from ingestor.errors import PoisonInput

__all__ = [
    "IST",
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_ID",
    "MAX_TEXT",
    "TERMINAL_STATUSES",
    "Postback",
    "PostbackError",
    "decode_postback",
    "decode_message",
    "encode_postback",
]

#: India Standard Time: the zone of the broker's zone-less timestamps (no DST, ever since 1945).
IST = dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")

#: Statuses after which an order never changes again (Kite docs, "Order statuses").
TERMINAL_STATUSES = frozenset({"COMPLETE", "CANCELLED", "REJECTED"})

# NUMERIC(18,7) holds magnitudes below 10**11.
_PRICE_LIMIT = Decimal(10) ** 11

#: Largest message accepted (a real postback is 1-2 kB).
MAX_BYTES = 64 * 1024
#: Deepest nesting of arrays and objects accepted (a postback nests 2 or 3 levels).
MAX_DEPTH = 32
#: Longest identifier (order ids, tags, symbols, statuses): far above the broker's, far
#: below what a B-tree index row can hold.
MAX_ID = 128
#: Longest free text (status messages).
MAX_TEXT = 4096
#: Earliest plausible timestamp.
MIN_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
#: How far past the local clock a timestamp may lie (clock skew, not a typo'd year).
MAX_FUTURE = dt.timedelta(days=3)

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Token = Annotated[int, msgspec.Meta(gt=0, le=(1 << 32) - 1)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]
Ident = Annotated[str, msgspec.Meta(max_length=MAX_ID)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class PostbackError(PoisonInput):
    """A message that is not a valid order postback; ``str()`` is the reason.

    (A :class:`ValueError` too, as it always was.)
    """


# a JSON string (the brackets inside one do not nest)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(rb"[\[\]{}]")


def _check_bounds(raw: bytes) -> None:
    """Refuse what would make the parser work unboundedly: too big, or nested too deep."""
    if len(raw) > MAX_BYTES:
        raise PostbackError(f"message of {len(raw)} bytes exceeds {MAX_BYTES}")
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return  # cannot nest deeper than it has brackets
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise PostbackError(f"nested deeper than {MAX_DEPTH} levels")
        else:
            depth -= 1


class Postback(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One order postback (Kite's ``data`` object), validated.

    Required: ``order_id``, ``status``, ``instrument_token``, ``transaction_type``,
    ``order_type`` and ``quantity`` -- without them nothing sound can be stored.  Every other
    field may be missing or null.  Timestamps are timezone-aware (:data:`IST` when the
    broker sent none).
    """

    order_id: NonEmpty
    status: NonEmpty
    instrument_token: Token
    transaction_type: Literal["BUY", "SELL"]
    order_type: Literal["MARKET", "LIMIT", "SL", "SL-M"]
    quantity: NonNegInt

    user_id: Ident | None = None
    unfilled_quantity: NonNegInt | None = None
    app_id: int | None = None
    checksum: Ident | None = None
    placed_by: Ident | None = None
    exchange_order_id: Ident | None = None
    parent_order_id: Ident | None = None
    status_message: Text | None = None
    status_message_raw: Text | None = None
    order_timestamp: dt.datetime | None = None
    exchange_update_timestamp: dt.datetime | None = None
    exchange_timestamp: dt.datetime | None = None
    variety: Ident | None = None
    exchange: Ident | None = None
    tradingsymbol: Ident | None = None
    validity: Ident | None = None
    product: Ident | None = None
    disclosed_quantity: NonNegInt | None = None
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    average_price: Decimal | None = None
    filled_quantity: NonNegInt = 0
    pending_quantity: NonNegInt | None = None
    cancelled_quantity: NonNegInt | None = None
    market_protection: Decimal | None = None
    meta: dict[str, Any] | None = None
    tag: Ident | None = None
    guid: Ident | None = None
    # also accepted by the official Go client's Order (gokiteconnect orders.go)
    account_id: Ident | None = None
    modified: bool | None = None
    validity_ttl: int | None = None
    auction_number: Union[Ident, int, None] = None
    tags: Annotated[list[Ident], msgspec.Meta(max_length=64)] | None = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError raised here into a ValidationError naming the message
        if self.filled_quantity > self.quantity:
            raise ValueError(f"filled_quantity {self.filled_quantity} exceeds quantity "
                             f"{self.quantity}")
        # contradictions the store would turn into wrong fills: a COMPLETE order with nothing
        # filled became final at 0 (the real fill, arriving later, was then dropped as
        # stale); a fill without an average price became an execution at price 0
        if self.status == "COMPLETE" and self.filled_quantity == 0:
            raise ValueError("status COMPLETE with filled_quantity 0 or absent")
        if self.filled_quantity > 0 and not self.average_price:
            raise ValueError(f"filled_quantity {self.filled_quantity} with average_price "
                             f"{self.average_price} (absent or 0)")
        for name in ("price", "trigger_price", "average_price"):
            v = getattr(self, name)
            if v is None:
                continue
            if not v.is_finite():
                raise ValueError(f"{name} is not a finite number")
            if v < 0:
                raise ValueError(f"{name} {v} is negative")
            if v >= _PRICE_LIMIT:
                raise ValueError(f"{name} {v} does not fit NUMERIC(18,7)")
        for name in ("order_timestamp", "exchange_update_timestamp", "exchange_timestamp"):
            v = getattr(self, name)
            if v is None:
                continue
            if v.tzinfo is None:
                v = v.replace(tzinfo=IST)
                setattr(self, name, v)
            try:
                bad = v < MIN_TIME or v > dt.datetime.now(dt.timezone.utc) + MAX_FUTURE
            except OverflowError:  # year 1 with a positive offset: before the epoch of time
                bad = True
            if bad:
                raise ValueError(f"{name} {v.isoformat()} is not a plausible time (before "
                                 f"{MIN_TIME.year} or more than {MAX_FUTURE.days} days ahead)")
        for name in ("order_id", "status", "status_message", "status_message_raw", "tag",
                     "tradingsymbol", "exchange", "exchange_order_id", "parent_order_id",
                     "placed_by", "product", "variety", "validity"):
            v = getattr(self, name)
            if v is not None and "\x00" in v:
                raise ValueError(f"{name} contains a NUL character")

    # ----------------------------------------------------------------------------------------
    @property
    def strategy_tag(self) -> str | None:
        """The tag naming the order's strategy: ``tag``, else the first of ``tags``."""
        if self.tag:
            return self.tag
        if self.tags:
            return self.tags[0] or None
        return None

    @property
    def is_terminal(self) -> bool:
        """The status is final (COMPLETE, CANCELLED, REJECTED)."""
        return self.status in TERMINAL_STATUSES


class _Envelope(msgspec.Struct):
    # a bare postback has neither key; the envelope has both
    type: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"")  # empty: absent


_envelope = msgspec.json.Decoder(_Envelope)
_postback = msgspec.json.Decoder(Postback)
_encoder = msgspec.json.Encoder(decimal_format="number")


def decode_message(raw: bytes | bytearray | memoryview | str) -> tuple[Postback, bytes]:
    """Decode a postback and also return its ``data`` object's JSON exactly as received.

    The store keeps that text in ``orders.last_postback`` so fields this project does not
    model survive.

    Raises
    ------
    PostbackError
        Not JSON, not an object, an envelope whose ``type`` is not ``"order"``, or a
        ``data`` object that fails validation; the message is the reason.
    """
    try:
        return _decode_message(raw)
    except PostbackError:
        raise
    except RecursionError:
        raise PostbackError("nested too deeply to decode") from None
    except Exception as exc:  # noqa: BLE001 - a hostile message must not escape as anything else
        raise PostbackError(f"cannot decode: {type(exc).__name__}: {exc}"[:500]) from None


def _decode_message(raw) -> tuple[Postback, bytes]:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
    _check_bounds(raw)
    try:
        env = _envelope.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PostbackError(f"not a JSON object: {exc}") from None
    if len(env.data) or env.type is not None:
        if env.type != "order":
            raise PostbackError(f"not an order message (type {env.type!r})")
        if not len(env.data) or bytes(env.data) == b"null":
            raise PostbackError("order message without data")
        data = bytes(env.data)
    else:
        data = raw
    try:
        pb = _postback.decode(data)
    except msgspec.ValidationError as exc:
        raise PostbackError(f"invalid postback: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PostbackError(f"malformed postback: {exc}") from None
    return pb, data


def decode_postback(raw: bytes | bytearray | memoryview | str) -> Postback:
    """Decode one order postback (the ``{"type":"order","data":{...}}`` envelope or bare data).

    Parameters
    ----------
    raw : bytes or str
        The WebSocket text message, or the HTTP postback body.

    Returns
    -------
    Postback

    Raises
    ------
    PostbackError
        With the reason (see :func:`decode_message`).

    Examples
    --------
    >>> pb = decode_postback('{"type":"order","data":{"order_id":"1","status":"OPEN",'
    ...     '"instrument_token":779521,"transaction_type":"BUY","order_type":"LIMIT",'
    ...     '"quantity":5,"price":470.05,"order_timestamp":"2022-03-03 09:24:25"}}')
    >>> pb.price, pb.order_timestamp.isoformat()
    (Decimal('470.05'), '2022-03-03T09:24:25+05:30')
    """
    return decode_message(raw)[0]


def encode_postback(pb: Postback) -> bytes:
    """JSON of a postback (prices as JSON numbers, exactly), e.g. for ``last_postback``."""
    return _encoder.encode(pb)
