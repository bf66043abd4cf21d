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
  (PostgreSQL text cannot).  Anything else raises :class:`PostbackError` with the reason;
  the store keeps such messages in ``postback_dead_letters``.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

import msgspec

__all__ = [
    "IST",
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

NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Token = Annotated[int, msgspec.Meta(gt=0, le=(1 << 63) - 1)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class PostbackError(ValueError):
    """A message that is not a valid order postback; ``str()`` is the reason."""


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

    user_id: str | None = None
    unfilled_quantity: NonNegInt | None = None
    app_id: int | None = None
    checksum: str | None = None
    placed_by: str | None = None
    exchange_order_id: str | None = None
    parent_order_id: str | None = None
    status_message: str | None = None
    status_message_raw: str | None = None
    order_timestamp: dt.datetime | None = None
    exchange_update_timestamp: dt.datetime | None = None
    exchange_timestamp: dt.datetime | None = None
    variety: str | None = None
    exchange: str | None = None
    tradingsymbol: str | None = None
    validity: str | None = None
    product: str | None = None
    disclosed_quantity: NonNegInt | None = None
    price: Decimal | None = None
    trigger_price: Decimal | None = None
    average_price: Decimal | None = None
    filled_quantity: NonNegInt = 0
    pending_quantity: NonNegInt | None = None
    cancelled_quantity: NonNegInt | None = None
    market_protection: Decimal | None = None
    meta: dict[str, Any] | None = None
    tag: str | None = None
    guid: str | None = None
    # also accepted by the official Go client's Order (gokiteconnect orders.go)
    account_id: str | None = None
    modified: bool | None = None
    validity_ttl: int | None = None
    auction_number: Union[str, int, None] = None
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        # msgspec turns a ValueError raised here into a ValidationError naming the message
        if self.filled_quantity > self.quantity:
            raise ValueError(f"filled_quantity {self.filled_quantity} exceeds quantity "
                             f"{self.quantity}")
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
            if v is not None and v.tzinfo is None:
                setattr(self, name, v.replace(tzinfo=IST))
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
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    elif not isinstance(raw, bytes):
        raw = bytes(raw)
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
