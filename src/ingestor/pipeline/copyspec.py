"""Column specs for PostgreSQL binary COPY encoding, shared by the core and its twin.

A COPY encoder turns rows of a numpy structured array (fixed-width integer
fields and ``(k,)`` integer subarrays) into a PostgreSQL binary COPY payload.
What each output column is made of is described once, as a list of column
specs, and parsed here into :class:`ColumnPlan` objects that the compiled
encoder (``ingestor._core.CopyEncoder``) and its pure-Python twin
(``ingestor.twin.copy.CopyEncoder``) both follow.  Parsing is plain Python run
once per encoder; nothing here runs per row.

Column specs
------------
Each spec is ``(name, type)`` or ``(name, type, options)``; ``name`` is the
table column (it is also the default source field).  Types:

``"int2"``, ``"int4"``, ``"int8"``
    smallint / integer / bigint from any integer field (signed or unsigned,
    1 to 8 bytes).  A value outside the target's range is an error naming the
    column, never a silent truncation.
``"timestamptz_s"``, ``"timestamptz_ms"``, ``"timestamptz_us"`` (alias ``"timestamptz"``), ``"timestamptz_ns"``
    timestamptz from an integer count of seconds / milliseconds / microseconds
    / nanoseconds since the Unix epoch (UTC).  Nanoseconds are floored to the
    microsecond (PostgreSQL's resolution).  A value outside PostgreSQL's
    timestamp range (4714-11-24 BC to 294276 AD) is an error.
``"numeric"``
    An exact decimal ``value / 10**scale`` from an integer field.  The scale
    comes from one of the options ``divisor_field`` (a per-row integer field
    holding a power of ten: 100 -> 2 decimals), ``divisor`` (a constant power
    of ten) or ``scale`` (a constant number of decimals: ``vwap_e7`` is
    ``{"scale": 7}``); none means 0.  The value is sent with ``dscale`` equal
    to that number of decimals, so raw 157370 with divisor 100 is 1573.70
    exactly.  A per-row divisor that is not a power of ten is an error.
``"int2[]"``, ``"int4[]"``, ``"int8[]"``, ``"numeric[]"``
    One-dimensional arrays (lower bound 1, no NULL elements) from a ``(k,)``
    integer subarray field, element by element as the scalar types; the
    numeric options apply to every element (``divisor_field`` is a scalar
    field of the same row).
``"text_lookup"``
    Text chosen by an integer field through ``table`` (a mapping int -> str).
    ``default`` is used for keys not in the table: ``None`` (the default)
    makes a missing key an error; a str is sent as is, or, for 1-byte source
    fields only, formatted with the key (``"SEG{}"``).
``"text"``
    A constant text, option ``value`` (no source field).

Options every type accepts (except constant ``text``):

``field``
    The source field's name when it differs from the column's.
``null_if_zero``
    True: NULL where the source value is 0 (scalar types only).
``null_unless_flag``
    ``(flags_field, mask)``: NULL unless ``row[flags_field] & mask`` is non-zero.
``null_if_flag``
    ``(flags_field, mask)``: NULL where ``row[flags_field] & mask`` is non-zero.

The rules combine: a column is NULL if any of its rules says so.  Rows whose
column is NULL are not checked for that column (a NULL quantity's value is
not range-checked).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

#: PostgreSQL type OIDs (``pg_type.dat``) of the element types arrays carry.
OIDS = {"int2": 21, "int4": 23, "int8": 20, "text": 25, "numeric": 1700, "timestamptz": 1184}

#: Inclusive ranges of the integer targets.
INT_RANGES = {
    "int2": (-(1 << 15), (1 << 15) - 1),
    "int4": (-(1 << 31), (1 << 31) - 1),
    "int8": (-(1 << 63), (1 << 63) - 1),
}

#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
PG_EPOCH_SHIFT_US = 946_684_800_000_000
#: PostgreSQL's valid timestamps, in µs since its epoch: MIN_TIMESTAMP <= t < END_TIMESTAMP
#: (``src/include/datatype/timestamp.h``; timestamptz_recv rejects anything else).
PG_MIN_TIMESTAMP = -211_813_488_000_000_000
PG_END_TIMESTAMP = 9_223_371_331_200_000_000

#: Largest numeric scale: 10**19 is the largest power of ten in a uint64.
MAX_SCALE = 19

#: Widest span of keys a text lookup table may cover (the core keeps it dense).
MAX_LOOKUP_SPAN = 1 << 16

_TS_UNITS = {"timestamptz": "us", "timestamptz_s": "s", "timestamptz_ms": "ms",
             "timestamptz_us": "us", "timestamptz_ns": "ns"}
_SCALARS = {"int2", "int4", "int8", "numeric"} | set(_TS_UNITS)
_ARRAYS = {"int2[]", "int4[]", "int8[]", "numeric[]"}
_COMMON_OPTIONS = {"field", "null_if_zero", "null_unless_flag", "null_if_flag"}
_OPTIONS = {
    "int2": _COMMON_OPTIONS, "int4": _COMMON_OPTIONS, "int8": _COMMON_OPTIONS,
    "numeric": _COMMON_OPTIONS | {"divisor_field", "divisor", "scale"},
    "timestamptz": _COMMON_OPTIONS,
    "text_lookup": _COMMON_OPTIONS | {"table", "default"},
    "text": {"value"},
}


class CopyEncodeError(ValueError):
    """A row could not be encoded.

    Attributes
    ----------
    column : str
        The output column whose value was refused.
    row : int
        The row's index in the array given to the encoder.
    value : int or None
        The offending source value (the divisor for a bad divisor).
    """

    def __init__(self, message: str, *, column: str, row: int, value: int | None = None):
        super().__init__(message)
        self.column = column
        self.row = row
        self.value = value


@dataclass(frozen=True)
class FieldRef:
    """Where an integer source field lies in a record and how to read it."""

    name: str
    offset: int
    size: int          # bytes: 1, 2, 4 or 8
    signed: bool
    big_endian: bool
    count: int         # elements of a (k,) subarray; 0 for a scalar field

    @property
    def lo(self) -> int:
        return -(1 << (8 * self.size - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (8 * self.size - 1)) - 1 if self.signed else (1 << (8 * self.size)) - 1


@dataclass(frozen=True)
class ColumnPlan:
    """One output column, parsed and checked against the dtype."""

    name: str
    type: str                      # canonical type, e.g. "numeric[]", "timestamptz"
    base: str                      # element type: "int2" ... "numeric", "timestamptz", "text"
    source: FieldRef | None        # None for a constant text
    ts_unit: str | None            # "s", "ms", "us" or "ns" for timestamptz
    scale: int | None              # numeric: constant decimals, None when per row
    divisor: FieldRef | None       # numeric: the per-row divisor field
    null_if_zero: bool
    null_unless_flag: tuple[FieldRef, int] | None
    null_if_flag: tuple[FieldRef, int] | None
    text: bytes | None             # constant text (UTF-8)
    table: dict[int, bytes] | None # text lookup (UTF-8), defaults of 1-byte fields expanded
    default: bytes | None          # text lookup: text for other keys, None: an error

    @property
    def is_array(self) -> bool:
        return self.type.endswith("[]")

    @property
    def count(self) -> int:
        return self.source.count if self.source is not None else 0


def _field(dtype: np.dtype, name, what: str, *, array: bool | None) -> FieldRef:
    if not isinstance(name, str) or dtype.names is None or name not in dtype.names:
        raise ValueError(f"{what}: no field {name!r} in the dtype")
    sub, offset = dtype.fields[name][:2]
    count = 0
    if sub.subdtype is not None:
        base, shape = sub.subdtype
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"{what}: field {name!r} has shape {shape}; arrays must be (k,) with k >= 1")
        count = shape[0]
    else:
        base = sub
    if base.kind not in "iub" or base.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"{what}: field {name!r} is {base}, not an integer field")
    if array is True and not count:
        raise ValueError(f"{what}: an array type needs a (k,) subarray field, {name!r} is scalar")
    if array is False and count:
        raise ValueError(f"{what}: field {name!r} is an array; use an array type")
    big = base.byteorder == ">" or (base.byteorder == "=" and sys.byteorder == "big")
    return FieldRef(name, int(offset), base.itemsize, base.kind == "i", big, count)


def _flag(dtype, value, what: str):
    if value is None:
        return None
    try:
        fname, mask = value
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (flags_field, mask), got {value!r}") from None
    ref = _field(dtype, fname, what, array=False)
    if not isinstance(mask, int) or mask <= 0 or mask > ref.hi - ref.lo:
        raise ValueError(f"{what}: mask {mask!r} must be a positive int that fits field {fname!r}")
    return ref, mask


def _utf8(text, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a str, got {text!r}")
    data = text.encode("utf-8")
    if "\x00" in text:
        raise ValueError(f"{what}: PostgreSQL text cannot hold NUL characters")
    return data


def scale_of_divisor(divisor: int) -> int | None:
    """The number of decimals of a power-of-ten divisor (``100 -> 2``), else None."""
    scale = 0
    power = 1
    while power < divisor and scale < MAX_SCALE:
        power *= 10
        scale += 1
    return scale if power == divisor and divisor >= 1 else None


def parse_columns(dtype, columns) -> list[ColumnPlan]:
    """Check column specs against a structured dtype and return their plans.

    Parameters
    ----------
    dtype : numpy.dtype
        The rows' structured dtype.
    columns : sequence of tuple
        ``(name, type)`` or ``(name, type, options)``; see the module docstring.

    Returns
    -------
    list of ColumnPlan

    Raises
    ------
    ValueError
        For an unknown type or option, a missing or unsuitable field, a
        divisor that is not a power of ten, or a bad lookup table.
    """
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise ValueError("the dtype must be a structured dtype")
    plans = []
    for spec in columns:
        if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
            raise ValueError(f"column spec {spec!r}: expected (name, type) or (name, type, options)")
        name, typ = spec[0], spec[1]
        opts = dict(spec[2]) if len(spec) == 3 and spec[2] is not None else {}
        if not isinstance(name, str) or not name:
            raise ValueError(f"column spec {spec!r}: the name must be a non-empty str")
        what = f"column {name!r}"
        if typ in _SCALARS or typ in _ARRAYS:
            array = typ in _ARRAYS
            base = typ[:-2] if array else typ
            ts_unit = _TS_UNITS.get(base)
            if ts_unit:
                base = "timestamptz"
        elif typ in ("text_lookup", "text"):
            array, base, ts_unit = False, "text", None
        else:
            raise ValueError(f"{what}: unknown type {typ!r}")
        allowed = _OPTIONS["text_lookup" if typ == "text_lookup" else "text" if typ == "text" else base]
        unknown = set(opts) - allowed
        if unknown:
            raise ValueError(f"{what}: unknown option(s) {sorted(unknown)} for type {typ!r}")

        if typ == "text":
            if "value" not in opts:
                raise ValueError(f"{what}: a constant text needs the option 'value'")
            plans.append(ColumnPlan(name, "text", "text", None, None, None, None, False, None,
                                    None, _utf8(opts["value"], what), None, None))
            continue

        source = _field(dtype, opts.get("field", name), what, array=array)
        null_if_zero = bool(opts.get("null_if_zero", False))
        if null_if_zero and array:
            raise ValueError(f"{what}: null_if_zero applies to scalar columns only")

        scale = divisor = None
        if base == "numeric":
            given = [k for k in ("divisor_field", "divisor", "scale") if k in opts]
            if len(given) > 1:
                raise ValueError(f"{what}: give one of divisor_field, divisor, scale (got {given})")
            if "divisor_field" in opts:
                divisor = _field(dtype, opts["divisor_field"], what, array=False)
            elif "divisor" in opts:
                d = opts["divisor"]
                scale = scale_of_divisor(d) if isinstance(d, int) else None
                if scale is None:
                    raise ValueError(f"{what}: divisor {d!r} is not a power of ten up to 10**{MAX_SCALE}")
            else:
                scale = opts.get("scale", 0)
                if not isinstance(scale, int) or not 0 <= scale <= MAX_SCALE:
                    raise ValueError(f"{what}: scale {scale!r} must be an int in 0..{MAX_SCALE}")

        table = default = None
        if typ == "text_lookup":
            raw = opts.get("table")
            if not hasattr(raw, "items") or not raw:
                raise ValueError(f"{what}: text_lookup needs a non-empty 'table' mapping int -> str")
            table = {}
            for key, text in raw.items():
                if not isinstance(key, int) or not source.lo <= key <= source.hi:
                    raise ValueError(f"{what}: key {key!r} cannot occur in field {source.name!r}")
                table[key] = _utf8(text, f"{what}, key {key}")
            dflt = opts.get("default")
            if dflt is not None:
                _utf8(dflt, f"{what}, default")
                if "{" in dflt:
                    if source.size != 1:
                        raise ValueError(f"{what}: a formatted default needs a 1-byte field "
                                         f"({source.name!r} has {source.size})")
                    for key in range(source.lo, source.hi + 1):
                        if key not in table:
                            table[key] = _utf8(dflt.format(key), f"{what}, default")
                else:
                    default = dflt.encode("utf-8")
            if max(table) - min(table) >= MAX_LOOKUP_SPAN:
                raise ValueError(f"{what}: lookup keys span more than {MAX_LOOKUP_SPAN} values")

        plans.append(ColumnPlan(
            name, "timestamptz" if base == "timestamptz" else typ, base,
            source, ts_unit, scale, divisor, null_if_zero,
            _flag(dtype, opts.get("null_unless_flag"), f"{what}, null_unless_flag"),
            _flag(dtype, opts.get("null_if_flag"), f"{what}, null_if_flag"),
            None, table, default))
    if not plans:
        raise ValueError("no columns")
    if len(plans) > 0x7FFF:
        raise ValueError("a COPY row holds at most 32767 fields")
    return plans


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def copy_statement(table: str, plans) -> str:
    """``COPY table (columns...) FROM STDIN (FORMAT BINARY)`` for these plans.

    ``table`` may be schema-qualified (``"public.tick_data"``); each part is
    quoted as an identifier.
    """
    target = ".".join(_quote_ident(part) for part in table.split("."))
    cols = ", ".join(_quote_ident(p.name) for p in plans)
    return f"COPY {target} ({cols}) FROM STDIN (FORMAT BINARY)"
