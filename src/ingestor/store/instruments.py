"""The instruments registry: Kite dump loads, and tokens first seen on the feed.

``load_csv`` reads a Kite instruments dump (the broker's CSV: ``instrument_token,
exchange_token, tradingsymbol, name, last_price, expiry, strike, tick_size, lot_size,
instrument_type, segment, exchange``), validates every line (a bad one is reported with its
line number, nothing is loaded), COPYs the rows into a temporary staging table and upserts
them by ``instrument_token`` in one transaction.

Two keys, and what happens when they disagree.  ``instrument_token`` is the feed's key and
the upsert's; ``(exchange, symbol)`` is unique too, because services look instruments up by
it.  The dump being loaded is the broker's current truth, so when one of its rows names an
``(exchange, symbol)`` that the table holds under a *different* token (a symbol reused after
expiry, a renamed scrip, two symbols swapped), the row in the table loses the name: its
symbol becomes ``'<symbol> [<its token>]'`` and it is marked inactive; then the dump's row is
upserted.  Rows are never deleted (tick rows keep pointing at them).  Within one file, the
same token twice: the later line wins; two tokens with the same (exchange, symbol): the later
line keeps the name, the earlier is stored renamed and inactive as above.

``register_tokens`` adds tokens the feed sends that the table does not know, so nothing is
dropped: the exchange comes from the token's low byte (Kite's segment id, SCHEMA_CONTRACT.md)
and the symbol is the placeholder ``TOKEN:<n>`` until a dump load names it (by token, so the
id -- and every tick already written with it -- stays).
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterable

log = logging.getLogger(__name__)

COLUMNS = ("instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
           "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange")

#: Kite's segment id (instrument_token & 0xff) -> exchange (SCHEMA_CONTRACT.md).
EXCHANGES = {1: "NSE", 2: "NFO", 3: "CDS", 4: "BSE", 5: "BFO", 6: "BCD", 7: "MCX", 8: "MCXSX",
             9: "NSE", 12: "NCO", 14: "NCDEX"}  # 14: Angel's ncx_fo (no Kite segment; ours)
#: segment ids whose placeholder segment differs from the exchange
_SEGMENT_NAMES = {9: "INDICES"}

PLACEHOLDER_PREFIX = "TOKEN:"

# serialises dump loads against each other (not against the feed's registrations)
_LOAD_LOCK = int.from_bytes(b"ingestor", "big") + 1


class InstrumentsFileError(ValueError):
    """The dump cannot be read or a line is malformed (message: ``FILE:LINE: what``)."""


def exchange_of(token: int) -> str:
    """The exchange of an instrument token, from its segment byte."""
    seg = int(token) & 0xFF
    return EXCHANGES.get(seg, f"SEG{seg}")


def divisor_of(token: int) -> int:
    """The price divisor of an instrument token's segment: prices are stored as raw/divisor.

    Kite sends prices as integers in paise (divisor 100), except CDS (segment 3: 10^7) and
    BCD and NCO (segments 6 and 12: 10^4), as ``KiteTicker._parse_binary`` divides them; the
    core decoder uses the same table.
    """
    seg = int(token) & 0xFF
    return 10_000_000 if seg == 3 else 10_000 if seg in (6, 12) else 100


def segment_of(token: int) -> str:
    """The placeholder segment of an unknown token (the exchange, or ``INDICES``)."""
    seg = int(token) & 0xFF
    return _SEGMENT_NAMES.get(seg, exchange_of(token))


def placeholder_symbol(token: int) -> str:
    return f"{PLACEHOLDER_PREFIX}{int(token)}"


# --------------------------------------------------------------------------------------------
# reading the dump


@dataclass(frozen=True)
class InstrumentRow:
    """One validated line of a dump, in the staging table's column order."""

    instrument_token: int
    exchange_token: int | None
    exchange: str
    symbol: str
    name: str | None
    instrument_type: str | None
    segment: str | None
    tick_size: Decimal | None
    lot_size: int | None
    expiry_date: dt.date | None
    strike_price: Decimal | None
    is_active: bool
    line: int


#: a cell longer than this is not a number (and is not echoed whole in the error)
_MAX_NUMBER_CHARS = 40
#: text cells: far above any real symbol or name, far below an index row's size limit
MAX_TEXT_CHARS = 256
#: prices (tick size, strike) are NUMERIC(18,7): 11 integer digits and 7 decimals, exactly
_MAX_PRICE = Decimal(10) ** 11
_PRICE_PLACES = 7


def _show(value: str) -> str:
    return repr(value if len(value) <= 24 else value[:24] + "...")


def _int(value: str, what: str, *, required=False, minimum=None, below=1 << 63):
    value = value.strip()
    if not value:
        if required:
            raise ValueError(f"{what} is empty")
        return None
    if len(value) > _MAX_NUMBER_CHARS:
        raise ValueError(f"{what} {_show(value)} is not an integer ({len(value)} characters)")
    try:
        n = int(value)
    except ValueError:
        try:  # "1.0" as some dumps write integers
            d = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"{what} {_show(value)} is not an integer") from None
        # the exponent first: int(Decimal("1e99999999")) would build a 100-million-digit number
        if not d.is_finite() or d.adjusted() > 19 or d != d.to_integral_value():
            raise ValueError(f"{what} {_show(value)} is not an integer in range") from None
        n = int(d)
    if minimum is not None and n < minimum:
        raise ValueError(f"{what} {_show(value)} is below {minimum}")
    if not -(1 << 63) <= n < below:
        raise ValueError(f"{what} {_show(value)} is out of range (at most {below - 1})")
    return n


def _dec(value: str, what: str):
    value = value.strip()
    if not value:
        return None
    if len(value) > _MAX_NUMBER_CHARS:
        raise ValueError(f"{what} {_show(value)} is not a number ({len(value)} characters)")
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{what} {_show(value)} is not a number") from None
    if not d.is_finite():
        raise ValueError(f"{what} {_show(value)} is not a finite number")
    if d < 0:
        raise ValueError(f"{what} {_show(value)} is negative")
    if d.adjusted() >= 11 or d >= _MAX_PRICE:
        raise ValueError(f"{what} {_show(value)} is out of range (below 10^11)")
    if d != d.quantize(Decimal(1).scaleb(-_PRICE_PLACES)):
        raise ValueError(f"{what} {_show(value)} has more than {_PRICE_PLACES} decimals "
                         f"(stored exactly or not at all)")
    return d


def _text(value: str, what: str) -> str:
    value = value.strip()
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} is {len(value)} characters long (at most {MAX_TEXT_CHARS})")
    return value


def _date(value: str, what: str):
    value = value.strip()
    if not value:
        return None
    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value)
        if len(value) <= 32:  # a timestamp: its date
            return dt.datetime.fromisoformat(value).date()
    except ValueError:
        pass
    raise ValueError(f"{what} {_show(value)} is not a date (YYYY-MM-DD)")


def read_csv(path: str | os.PathLike) -> list[InstrumentRow]:
    """Read and validate a Kite instruments dump.

    Returns
    -------
    list of InstrumentRow
        One per distinct token, in file order, with in-file (exchange, symbol) conflicts
        already resolved (see the module docstring).

    Raises
    ------
    InstrumentsFileError
        The file is missing/unreadable, has no header with the dump's columns, or a line is
        malformed; the message names the file and line.
    """
    name = os.fspath(path)
    try:
        fh = open(name, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InstrumentsFileError(f"cannot read {name}: {exc.strerror or exc}") from None
    with fh:
        try:
            return _parse(csv.reader(fh), name)
        except UnicodeDecodeError as exc:
            raise InstrumentsFileError(f"{name}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise InstrumentsFileError(f"{name}: malformed CSV: {exc}") from None


def _parse(reader, name: str) -> list[InstrumentRow]:
    header = next(reader, None)
    if header is None:
        raise InstrumentsFileError(f"{name}:1: empty file (expected the instruments CSV header)")
    cols = [h.strip().lower() for h in header]
    dup = sorted({c for c in cols if c and cols.count(c) > 1})
    if dup:
        raise InstrumentsFileError(f"{name}:1: column(s) {', '.join(dup)} appear more than once")
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise InstrumentsFileError(
            f"{name}:1: not a Kite instruments dump: missing column(s) {', '.join(missing)}")
    idx = {c: cols.index(c) for c in COLUMNS}
    by_token: dict[int, InstrumentRow] = {}
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(cols):
            raise InstrumentsFileError(
                f"{name}:{line}: {len(fields)} fields, the header has {len(cols)}")
        f = {c: fields[i] for c, i in idx.items()}
        try:
            bad = next((c for c, v in f.items() if "\x00" in v), None)
            if bad is not None:
                raise ValueError(f"{bad} contains a NUL character")
            # Kite tokens are unsigned 32-bit (the feed's packets carry 4 bytes)
            token = _int(f["instrument_token"], "instrument_token", required=True, minimum=1,
                         below=1 << 32)
            symbol = _text(f["tradingsymbol"], "tradingsymbol")
            exchange = _text(f["exchange"], "exchange")
            if not symbol:
                raise ValueError("tradingsymbol is empty")
            if not exchange:
                raise ValueError("exchange is empty")
            lot = _int(f["lot_size"], "lot_size", minimum=0)
            if lot is not None and lot >= 1 << 31:
                raise ValueError(f"lot_size {lot} is out of range")
            row = InstrumentRow(
                instrument_token=token,
                exchange_token=_int(f["exchange_token"], "exchange_token", minimum=0,
                                    below=1 << 32),
                exchange=exchange, symbol=symbol,
                name=_text(f["name"], "name") or None,
                instrument_type=_text(f["instrument_type"], "instrument_type") or None,
                segment=_text(f["segment"], "segment") or None,
                tick_size=_dec(f["tick_size"], "tick_size"),
                lot_size=lot,
                expiry_date=_date(f["expiry"], "expiry"),
                strike_price=_dec(f["strike"], "strike"),
                is_active=True, line=line)
        except ValueError as exc:
            raise InstrumentsFileError(f"{name}:{line}: {exc}") from None
        by_token.pop(token, None)  # the later line wins (and takes the later position)
        by_token[token] = row
    rows = list(by_token.values())
    # the same (exchange, symbol) under two tokens in one file: the later line keeps it
    holder: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        key = (row.exchange, row.symbol)
        if key in holder:
            j = holder[key]
            prev = rows[j]
            log.warning("%s:%d: %s:%s also on line %d (token %d); the later line keeps the name",
                        name, row.line, row.exchange, row.symbol, prev.line, prev.instrument_token)
            rows[j] = _renamed(prev)
        holder[key] = i
    return rows


def _renamed(row: InstrumentRow) -> InstrumentRow:
    from dataclasses import replace

    return replace(row, symbol=f"{row.symbol} [{row.instrument_token}]", is_active=False)


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadResult:
    """What :func:`load_csv` / :func:`load_rows` did."""

    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    renamed: int = 0
    deactivated: int = 0


_STAGING = """
CREATE TEMPORARY TABLE instruments_staging (
    instrument_token bigint NOT NULL, exchange_token bigint, exchange text NOT NULL,
    symbol text NOT NULL, name text, instrument_type text, segment text,
    tick_size numeric, lot_size integer, expiry_date date, strike_price numeric,
    is_active boolean NOT NULL
) ON COMMIT DROP
"""
_STAGING_COLUMNS = ("instrument_token", "exchange_token", "exchange", "symbol", "name",
                    "instrument_type", "segment", "tick_size", "lot_size", "expiry_date",
                    "strike_price", "is_active")

# Free every (exchange, symbol) the dump assigns to a token other than the current holder's.
_FREE_KEYS = """
UPDATE instruments i
   SET symbol = i.symbol || ' [' || i.instrument_token || ']', is_active = false,
       updated_at = now()
  FROM instruments_staging s
 WHERE i.exchange = s.exchange AND i.symbol = s.symbol
   AND i.instrument_token <> s.instrument_token AND i.broker = 'kite'
"""

_UPSERT = """
INSERT INTO instruments AS i (instrument_token, exchange_token, exchange, symbol, name,
                              instrument_type, segment, tick_size, lot_size, expiry_date,
                              strike_price, is_active)
SELECT instrument_token, exchange_token, exchange, symbol, name, instrument_type, segment,
       tick_size, lot_size, expiry_date, strike_price, is_active
  FROM instruments_staging
ON CONFLICT (instrument_token) DO UPDATE SET
       exchange_token = excluded.exchange_token, exchange = excluded.exchange,
       symbol = excluded.symbol, name = excluded.name,
       instrument_type = excluded.instrument_type, segment = excluded.segment,
       tick_size = excluded.tick_size, lot_size = excluded.lot_size,
       expiry_date = excluded.expiry_date, strike_price = excluded.strike_price,
       is_active = excluded.is_active, updated_at = now()
 WHERE (i.exchange_token, i.exchange, i.symbol, i.name, i.instrument_type, i.segment,
        i.tick_size, i.lot_size, i.expiry_date, i.strike_price, i.is_active)
       IS DISTINCT FROM
       (excluded.exchange_token, excluded.exchange, excluded.symbol, excluded.name,
        excluded.instrument_type, excluded.segment, excluded.tick_size, excluded.lot_size,
        excluded.expiry_date, excluded.strike_price, excluded.is_active)
RETURNING (xmax = 0) AS inserted
"""

_DEACTIVATE = """
UPDATE instruments SET is_active = false, updated_at = now()
 WHERE is_active AND broker = 'kite'
   AND NOT EXISTS (SELECT 1 FROM instruments_staging s
                    WHERE s.instrument_token = instruments.instrument_token)
"""


def load_rows(conn, rows: Iterable[InstrumentRow], *, deactivate_missing: bool = False) -> LoadResult:
    """Upsert validated rows in one transaction (COPY to staging, then SQL).

    Parameters
    ----------
    conn : psycopg.Connection
        Commits when it was idle; inside a caller's transaction, becomes a savepoint.
    rows : iterable of InstrumentRow
        As :func:`read_csv` returns them (distinct tokens, distinct (exchange, symbol)).
    deactivate_missing : bool
        The file is a complete dump: instruments it does not list are marked inactive
        (expired contracts).  Off by default, so a partial file only adds and updates.
    """
    rows = list(rows)
    res = LoadResult(rows=len(rows))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOAD_LOCK,))
        conn.execute(_STAGING)
        with conn.cursor().copy(
                f"COPY instruments_staging ({', '.join(_STAGING_COLUMNS)}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row((r.instrument_token, r.exchange_token, r.exchange, r.symbol, r.name,
                              r.instrument_type, r.segment, r.tick_size, r.lot_size,
                              r.expiry_date, r.strike_price, r.is_active))
        res.renamed = conn.execute(_FREE_KEYS).rowcount
        flags = [row[0] for row in conn.execute(_UPSERT).fetchall()]
        res.inserted = sum(1 for f in flags if f)
        res.updated = len(flags) - res.inserted
        res.unchanged = res.rows - len(flags)
        if deactivate_missing:
            res.deactivated = conn.execute(_DEACTIVATE).rowcount
    return res


def load_csv(conn, path: str | os.PathLike, *, deactivate_missing: bool = False) -> LoadResult:
    """Validate a Kite instruments dump and upsert it (see :func:`read_csv`, :func:`load_rows`).

    Raises
    ------
    InstrumentsFileError
        Bad file (nothing is loaded).
    """
    return load_rows(conn, read_csv(path), deactivate_missing=deactivate_missing)


# --------------------------------------------------------------------------------------------
# the feed's view: token -> id

_REGISTER = """
INSERT INTO instruments (instrument_token, exchange, symbol, segment)
SELECT t.token, t.exchange, t.symbol, t.segment
  FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[])
       AS t (token, exchange, symbol, segment)
ON CONFLICT DO NOTHING
"""
# a broker's keys only: a Kite token equal to another broker's key is refused ("could not
# register"), never given that instrument's id (0006_broker_keys.sql)
_IDS_OF = ("SELECT instrument_token, id FROM instruments "
           "WHERE instrument_token = ANY(%s::bigint[]) AND broker = %s")
_ALL_IDS = "SELECT instrument_token, id FROM instruments"


def _register_params(tokens: list[int]):
    return (tokens, [exchange_of(t) for t in tokens], [placeholder_symbol(t) for t in tokens],
            [segment_of(t) for t in tokens])


def _check_tokens(tokens) -> list[int]:
    out = sorted({int(t) for t in tokens})
    for t in out:
        if not 0 < t < (1 << 32):
            raise ValueError(f"not an instrument token: {t}")
    return out


def register_tokens(conn, tokens: Iterable[int], broker: str = "kite") -> dict[int, int]:
    """Ids of ``tokens``, registering the unknown ones (placeholder symbol ``TOKEN:<n>``).

    Call it outside the flush transaction (on an idle connection it commits at once), so
    the ids exist for everyone before any row uses them.  Safe concurrently with other
    daemons and with dump loads (``ON CONFLICT DO NOTHING``, then read back).

    ``broker="angel"``: the tokens are Angel engine keys, registered already when the
    decoder first met them (:func:`register_angel`): their ids are only read.

    Returns
    -------
    dict
        ``{instrument_token: instruments.id}`` for every token given.
    """
    toks = _check_tokens(tokens)
    if not toks:
        return {}
    with conn.transaction():
        if broker == "kite":
            conn.execute(_REGISTER, _register_params(toks))
        ids = {int(t): int(i) for t, i in conn.execute(_IDS_OF, (toks, broker))}
    missing = [t for t in toks if t not in ids]
    if missing:  # only if some other row holds (exchange, 'TOKEN:<n>') -- never in practice
        raise RuntimeError(f"could not register instrument token(s) {missing[:5]}")
    return ids


def load_ids(conn) -> dict[int, int]:
    """``{instrument_token: id}`` of every instrument (the daemon's map at start).

    A row whose token the engine cannot key (0, or 2^32 and over: written by hand or by an
    older version, since every entry point refuses them now) is left out and said once: one
    bad registry row never stops the engine."""
    return _keyable(conn.execute(_ALL_IDS))


async def aregister_tokens(conn, tokens: Iterable[int]) -> dict[int, int]:
    """Async twin of :func:`register_tokens` (a :class:`psycopg.AsyncConnection`)."""
    toks = _check_tokens(tokens)
    if not toks:
        return {}
    async with conn.transaction():
        await conn.execute(_REGISTER, _register_params(toks))
        cur = await conn.execute(_IDS_OF, (toks, "kite"))
        ids = {int(t): int(i) for t, i in await cur.fetchall()}
    missing = [t for t in toks if t not in ids]
    if missing:
        raise RuntimeError(f"could not register instrument token(s) {missing[:5]}")
    return ids


async def aload_ids(conn) -> dict[int, int]:
    """Async twin of :func:`load_ids`."""
    cur = await conn.execute(_ALL_IDS)
    return _keyable(await cur.fetchall())


def _keyable(rows) -> dict[int, int]:
    ids, bad = {}, []
    for t, i in rows:
        if 0 < int(t) < 1 << 32:
            ids[int(t)] = int(i)
        else:
            bad.append(int(i))
    if bad:
        log.warning("%d instrument row(s) with a token the engine cannot key (0, or 2^32 and "
                    "over) left out: instruments.id %s%s", len(bad),
                    ", ".join(map(str, bad[:5])), " ..." if len(bad) > 5 else "")
    return ids



# --------------------------------------------------------------------------------------------
# Angel One: the instrument master (OpenAPIScripMaster.json) and tokens first seen on the feed
#
# The master is a JSON array of objects with string values: ``token``, ``symbol``, ``name``,
# ``expiry`` (``25FEB2021``), ``strike`` and ``tick_size`` in paise (``-1.000000``: no
# strike), ``lotsize``, ``instrumenttype`` and ``exch_seg``.  An Angel instrument is keyed by
# (exchange type, token) and its ``instrument_token`` is the engine key the registry assigns
# once (see sql/0006_broker_keys.sql).  Unlike the Kite dump, whose lines are all or nothing,
# a bad row of the master is set aside and counted by reason (the master is a broker file of
# ~10^5 rows that has carried odd rows); a file that is not a JSON array of objects is
# refused whole.

#: the master's ``exch_seg`` -> SmartStream exchange type
ANGEL_EXCHANGE_TYPES = {"NSE": 1, "NFO": 2, "BSE": 3, "BFO": 4, "MCX": 5, "NCDEX": 7, "CDS": 13}
#: a master larger than this is not one (the real one is tens of MB)
ANGEL_MAX_BYTES = 512 << 20
_MONTHS = {m: i + 1 for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL",
                                           "AUG", "SEP", "OCT", "NOV", "DEC"))}
_ANGEL_LOCK = _LOAD_LOCK + 1


def angel_segment(exchange_type: int) -> int:
    """The segment code of an exchange type: the low byte of its engine keys."""
    from ingestor._core import SS_SEGMENTS

    return SS_SEGMENTS[exchange_type]


def angel_exchange(exchange_type: int) -> str:
    """``instruments.exchange`` (and ``tick_data.exchange``) of an exchange type."""
    return EXCHANGES[angel_segment(exchange_type)]


@dataclass(frozen=True)
class AngelRow:
    """One validated row of the Angel instrument master."""

    exchange_type: int
    token: str
    exchange: str
    symbol: str
    name: str | None
    instrument_type: str | None
    segment: str
    tick_size: Decimal | None
    lot_size: int | None
    expiry_date: dt.date | None
    strike_price: Decimal | None
    is_active: bool
    index: int


@dataclass
class AngelRead:
    """What :func:`read_angel` kept and set aside (``rejected``: reason -> rows)."""

    rows: list
    rejected: dict
    examples: list


def _angel_text(v, what: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{what} is not a string")
    v = str(v)
    if "\x00" in v:
        raise ValueError(f"{what} contains a NUL character")
    return _text(v, what)


def _angel_paise(v, what: str, *, none_if_negative: bool) -> Decimal | None:
    text = _angel_text(v, what)
    if not text:
        return None
    d = _dec(text.lstrip("-"), what)
    if text.startswith("-"):
        if none_if_negative:
            return None
        raise ValueError(f"{what} {_show(text)} is negative")
    # paise to rupees: exact (two more decimals), then within NUMERIC(18,7)
    return _dec(str(d / 100), what)


def _angel_expiry(v) -> dt.date | None:
    text = _angel_text(v, "expiry").upper()
    if not text:
        return None
    if len(text) == 9 and text[:2].isdigit() and text[2:5] in _MONTHS and text[5:].isdigit():
        try:
            return dt.date(int(text[5:]), _MONTHS[text[2:5]], int(text[:2]))
        except ValueError:
            pass
    raise ValueError(f"expiry {_show(text)} is not a date like 25FEB2021")


def _angel_row(obj, index: int) -> AngelRow:
    if not isinstance(obj, dict):
        raise ValueError("row is not an object")
    seg_name = _angel_text(obj.get("exch_seg"), "exch_seg").upper()
    if seg_name not in ANGEL_EXCHANGE_TYPES:
        raise ValueError(f"exch_seg {_show(seg_name)} is not one of "
                         f"{', '.join(ANGEL_EXCHANGE_TYPES)}")
    etype = ANGEL_EXCHANGE_TYPES[seg_name]
    token = _angel_text(obj.get("token"), "token")
    if not 1 <= len(token) <= 25 or any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"token {_show(token)} is not 1..25 printable ASCII characters")
    symbol = _angel_text(obj.get("symbol"), "symbol")
    if not symbol:
        raise ValueError("symbol is empty")
    lot = _int(_angel_text(obj.get("lotsize"), "lotsize"), "lotsize", minimum=0)
    if lot is not None and lot >= 1 << 31:
        raise ValueError(f"lotsize {lot} is out of range")
    return AngelRow(
        exchange_type=etype, token=token, exchange=angel_exchange(etype), symbol=symbol,
        name=_angel_text(obj.get("name"), "name") or None,
        instrument_type=_angel_text(obj.get("instrumenttype"), "instrumenttype") or None,
        segment=seg_name,
        tick_size=_angel_paise(obj.get("tick_size"), "tick_size", none_if_negative=False),
        lot_size=lot, expiry_date=_angel_expiry(obj.get("expiry")),
        strike_price=_angel_paise(obj.get("strike"), "strike", none_if_negative=True),
        is_active=True, index=index)


def read_angel(path: str | os.PathLike) -> AngelRead:
    """Read and validate an Angel One instrument master (``OpenAPIScripMaster.json``).

    Rows that do not validate are set aside, counted by reason (``AngelRead.rejected``, the
    first few in ``examples`` with their position); within the file the same (exchange type,
    token) twice keeps the later row, and two tokens with one (exchange, symbol) leave the
    name to the later row (the earlier stored renamed and inactive, as for Kite dumps).

    Raises
    ------
    InstrumentsFileError
        The file is missing, unreadable, too large, not UTF-8 JSON, or not an array.
    """
    import msgspec

    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            data = fh.read(ANGEL_MAX_BYTES + 1)
    except OSError as exc:
        raise InstrumentsFileError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > ANGEL_MAX_BYTES:
        raise InstrumentsFileError(f"{name}: larger than {ANGEL_MAX_BYTES >> 20} MiB: not an "
                                   f"instrument master")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        items = msgspec.json.decode(data, type=list[msgspec.Raw])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InstrumentsFileError(f"{name}: not an Angel One instrument master (a JSON "
                                   f"array of objects): {str(exc)[:200]}") from None
    rejected: dict[str, int] = {}
    examples: list[str] = []
    by_key: dict[tuple[int, str], AngelRow] = {}
    for i, raw in enumerate(items):
        try:
            obj = msgspec.json.decode(raw)
            row = _angel_row(obj, i)
        except (ValueError, msgspec.DecodeError, RecursionError) as exc:
            reason = str(exc).split(" ", 1)[0] if isinstance(exc, ValueError) else "json"
            rejected[reason] = rejected.get(reason, 0) + 1
            if len(examples) < 5:
                examples.append(f"{name}: row {i}: {str(exc)[:200]}")
            continue
        key = (row.exchange_type, row.token)
        by_key.pop(key, None)
        by_key[key] = row
    rows = list(by_key.values())
    holder: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        k = (row.exchange, row.symbol)
        if k in holder:
            from dataclasses import replace

            j = holder[k]
            rows[j] = replace(rows[j], symbol=f"{rows[j].symbol} [{rows[j].token}]",
                              is_active=False)
        holder[k] = i
    return AngelRead(rows, rejected, examples)


_ANGEL_STAGING = """
CREATE TEMPORARY TABLE angel_staging (
    exchange_type smallint NOT NULL, broker_token text NOT NULL, seg integer NOT NULL,
    exchange text NOT NULL, symbol text NOT NULL, name text, instrument_type text,
    segment text, tick_size numeric, lot_size integer, expiry_date date,
    strike_price numeric, is_active boolean NOT NULL
) ON COMMIT DROP
"""
_ANGEL_STAGING_COLUMNS = ("exchange_type", "broker_token", "seg", "exchange", "symbol", "name",
                          "instrument_type", "segment", "tick_size", "lot_size", "expiry_date",
                          "strike_price", "is_active")
_ANGEL_FREE_KEYS = """
UPDATE instruments i
   SET symbol = i.symbol || ' [' || i.broker_token || ']', is_active = false, updated_at = now()
  FROM angel_staging s
 WHERE i.broker = 'angel' AND i.exchange = s.exchange AND i.symbol = s.symbol
   AND (i.exchange_type, i.broker_token) <> (s.exchange_type, s.broker_token)
"""
_ANGEL_UPDATE = """
UPDATE instruments i
   SET exchange = s.exchange, symbol = s.symbol, name = s.name,
       instrument_type = s.instrument_type, segment = s.segment, tick_size = s.tick_size,
       lot_size = s.lot_size, expiry_date = s.expiry_date, strike_price = s.strike_price,
       is_active = s.is_active, updated_at = now()
  FROM angel_staging s
 WHERE i.broker = 'angel' AND i.exchange_type = s.exchange_type
   AND i.broker_token = s.broker_token
   AND (i.exchange, i.symbol, i.name, i.instrument_type, i.segment, i.tick_size, i.lot_size,
        i.expiry_date, i.strike_price, i.is_active)
       IS DISTINCT FROM
       (s.exchange, s.symbol, s.name, s.instrument_type, s.segment, s.tick_size, s.lot_size,
        s.expiry_date, s.strike_price, s.is_active)
"""
# new instruments only draw engine keys (the anti-join runs before nextval); a feed
# registration racing this load is the only conflict tolerated: an engine key taken by a
# Kite token is a unique violation, the load refused
_ANGEL_INSERT = """
INSERT INTO instruments (broker, exchange_type, broker_token, instrument_token, exchange,
                         symbol, name, instrument_type, segment, tick_size, lot_size,
                         expiry_date, strike_price, is_active)
SELECT 'angel', s.exchange_type, s.broker_token,
       (nextval('instruments_angel_key_seq')::bigint << 8) | s.seg, s.exchange, s.symbol,
       s.name, s.instrument_type, s.segment, s.tick_size, s.lot_size, s.expiry_date,
       s.strike_price, s.is_active
  FROM angel_staging s
 WHERE NOT EXISTS (SELECT 1 FROM instruments i
                    WHERE i.broker = 'angel' AND i.exchange_type = s.exchange_type
                      AND i.broker_token = s.broker_token)
ON CONFLICT (broker, exchange_type, broker_token) DO NOTHING
"""
_ANGEL_DEACTIVATE = """
UPDATE instruments SET is_active = false, updated_at = now()
 WHERE is_active AND broker = 'angel'
   AND NOT EXISTS (SELECT 1 FROM angel_staging s
                    WHERE s.exchange_type = instruments.exchange_type
                      AND s.broker_token = instruments.broker_token)
"""


def load_angel(conn, rows: Iterable[AngelRow], *, deactivate_missing: bool = False) -> LoadResult:
    """Upsert validated Angel rows in one transaction (COPY to staging, then SQL), new
    instruments getting their engine keys.  ``deactivate_missing``: as :func:`load_rows`."""
    rows = list(rows)
    res = LoadResult(rows=len(rows))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ANGEL_LOCK,))
        conn.execute(_ANGEL_STAGING)
        with conn.cursor().copy(f"COPY angel_staging ({', '.join(_ANGEL_STAGING_COLUMNS)}) "
                                "FROM STDIN") as cp:
            for r in rows:
                cp.write_row((r.exchange_type, r.token, angel_segment(r.exchange_type),
                              r.exchange, r.symbol, r.name, r.instrument_type, r.segment,
                              r.tick_size, r.lot_size, r.expiry_date, r.strike_price,
                              r.is_active))
        res.renamed = conn.execute(_ANGEL_FREE_KEYS).rowcount
        res.updated = conn.execute(_ANGEL_UPDATE).rowcount
        res.inserted = conn.execute(_ANGEL_INSERT).rowcount
        res.unchanged = res.rows - res.updated - res.inserted
        if deactivate_missing:
            res.deactivated = conn.execute(_ANGEL_DEACTIVATE).rowcount
    return res


_ANGEL_REGISTER = """
INSERT INTO instruments (broker, exchange_type, broker_token, instrument_token, exchange,
                         symbol, segment)
SELECT 'angel', %(etype)s, %(token)s, (nextval('instruments_angel_key_seq')::bigint << 8) | %(seg)s,
       %(exchange)s, %(symbol)s, %(segment)s
 WHERE NOT EXISTS (SELECT 1 FROM instruments
                    WHERE broker = 'angel' AND exchange_type = %(etype)s
                      AND broker_token = %(token)s)
ON CONFLICT (broker, exchange_type, broker_token) DO NOTHING
"""
_ANGEL_KEY_OF = ("SELECT instrument_token FROM instruments "
                 "WHERE broker = 'angel' AND exchange_type = %s AND broker_token = %s")
_ANGEL_KEYS = ("SELECT exchange_type, broker_token, instrument_token FROM instruments "
               "WHERE broker = 'angel'")


def register_angel(conn, exchange_type: int, token: str) -> int:
    """The engine key of an Angel token, registering it when unknown (placeholder symbol
    ``TOKEN:<token>`` until a master load names it, by key: the id stays).  The decoder's
    resolver (``SmartStreamDecoder.resolver``); commits at once on an idle connection."""
    seg = angel_segment(exchange_type)
    if not 1 <= len(token) <= 25:
        raise ValueError(f"not an Angel token: {token[:40]!r}")
    with conn.transaction():
        conn.execute(_ANGEL_REGISTER, {
            "etype": exchange_type, "token": token, "seg": seg,
            "exchange": angel_exchange(exchange_type),
            "symbol": placeholder_symbol_angel(token),
            "segment": next(k for k, v in ANGEL_EXCHANGE_TYPES.items() if v == exchange_type)})
        row = conn.execute(_ANGEL_KEY_OF, (exchange_type, token)).fetchone()
    if row is None:
        raise RuntimeError(f"could not register Angel token {token!r} of exchange type "
                           f"{exchange_type}")
    return int(row[0])


def placeholder_symbol_angel(token: str) -> str:
    return f"{PLACEHOLDER_PREFIX}{token}"


def angel_keys(conn) -> list[tuple[int, str, int]]:
    """``(exchange_type, token, engine key)`` of every Angel instrument (the decoder's
    preload: ``SmartStreamDecoder.add_keys``)."""
    return [(int(e), str(t), int(k)) for e, t, k in conn.execute(_ANGEL_KEYS)]


def angel_decoder(conn, capacity: int = 8192):
    """A ``SmartStreamDecoder`` keyed by the registry: every Angel key preloaded, a token first
    met on the feed registered (:func:`register_angel`) before its first tick is decoded.
    ``conn`` is used from the decoding thread (the pipeline's, as its ``resolve``)."""
    from ingestor._core import SmartStreamDecoder

    dec = SmartStreamDecoder(capacity)
    dec.add_keys(angel_keys(conn))
    dec.resolver = lambda etype, token: register_angel(conn, etype, token)
    return dec
