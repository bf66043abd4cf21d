"""Pure-Python twin of the core's binary COPY encoder: the test oracle.

Same column specs (parsed by :mod:`ingestor.pipeline.copyspec`), same payloads byte for
byte, same errors, written the plain way: Python ints read from the numpy
record, ``struct`` for the wire integers and :class:`decimal.Decimal` for
numerics (decimal digits regrouped into base-10000 digits from the string
form, rather than the core's integer arithmetic).  Slow; never on the hot
path.
"""

from __future__ import annotations

import struct
from decimal import Decimal

import numpy as np

from ingestor.pipeline.copyspec import (
    INT_RANGES,
    OIDS,
    PG_END_TIMESTAMP,
    PG_EPOCH_SHIFT_US,
    PG_MIN_TIMESTAMP,
    CopyEncodeError,
    copy_statement,
    parse_columns,
    scale_of_divisor,
)

#: PostgreSQL docs, COPY "Binary Format": signature, flags, header extension length.
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)

_INT_FORMATS = {"int2": ">h", "int4": ">i", "int8": ">q"}
_UNIT_US = {"s": (1_000_000, 1), "ms": (1000, 1), "us": (1, 1), "ns": (1, 1000)}


def numeric_send(value: Decimal) -> bytes:
    """The body of numeric_send for a finite Decimal (dscale = its exponent's digits)."""
    sign, digits, exponent = value.as_tuple()
    dscale = max(0, -exponent)
    text = "".join(map(str, digits))
    if exponent > 0:
        text += "0" * exponent
        exponent = 0
    text = text.rjust(1 - exponent, "0")      # "1" at exponent -2 is 0.01: "001"
    int_part = text[:len(text) + exponent] if exponent else text
    frac_part = text[len(text) + exponent:] if exponent else ""
    int_part = int_part.lstrip("0")
    # Group from the decimal point outwards: pad the integer part on the left
    # and the fraction on the right to whole base-10000 digits.
    int_part = "0" * (-len(int_part) % 4) + int_part
    frac_part = frac_part + "0" * (-len(frac_part) % 4)
    groups = [int(int_part[i:i + 4]) for i in range(0, len(int_part), 4)]
    weight = len(groups) - 1
    groups += [int(frac_part[i:i + 4]) for i in range(0, len(frac_part), 4)]
    while groups and groups[0] == 0:
        groups.pop(0)
        weight -= 1
    while groups and groups[-1] == 0:
        groups.pop()
    if not groups:
        weight, sign = 0, 0
    return struct.pack(f">hhHh{len(groups)}H", len(groups), weight,
                       0x4000 if sign else 0, dscale, *groups)


def _field(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


class CopyEncoder:
    """The twin of :class:`ingestor._core.CopyEncoder` (``encode`` and the stream)."""

    def __init__(self, dtype, columns):
        self.dtype = np.dtype(dtype)
        self.plans = tuple(parse_columns(self.dtype, columns))
        self.columns = tuple(p.name for p in self.plans)
        self._buf = bytearray()
        self.rows = 0

    def copy_sql(self, table: str) -> str:
        return copy_statement(table, self.plans)

    # -- rows -----------------------------------------------------------------

    def _error(self, plan, row, what, value, elem=None):
        where = f"column {plan.name!r} ({plan.type}), row {row}"
        if elem is not None:
            where += f", element {elem}"
        raise CopyEncodeError(f"{where}: {what}", column=plan.name, row=row, value=value)

    def _scale(self, plan, rec, row):
        if plan.divisor is None:
            return plan.scale or 0
        d = int(rec[plan.divisor.name])
        scale = scale_of_divisor(d) if d > 0 else None
        if scale is None:
            self._error(plan, row, f"divisor {d} is not a power of ten", d)
        return scale

    def _is_null(self, plan, rec) -> bool:
        if plan.null_unless_flag is not None:
            ref, mask = plan.null_unless_flag
            if not (int(rec[ref.name]) & mask):
                return True
        if plan.null_if_flag is not None:
            ref, mask = plan.null_if_flag
            if int(rec[ref.name]) & mask:
                return True
        return plan.null_if_zero and int(rec[plan.source.name]) == 0

    def _int(self, plan, value, row, elem=None) -> bytes:
        lo, hi = INT_RANGES[plan.base]
        if not lo <= value <= hi:
            self._error(plan, row, f"value {value} out of range for {plan.base}", value, elem)
        return _field(struct.pack(_INT_FORMATS[plan.base], value))

    def _timestamp(self, plan, value, row) -> bytes:
        mul, div = _UNIT_US[plan.ts_unit]
        pg = value * mul // div - PG_EPOCH_SHIFT_US    # floor division: ns to µs
        if not PG_MIN_TIMESTAMP <= pg < PG_END_TIMESTAMP:
            self._error(plan, row, f"{value} {plan.ts_unit} since the Unix epoch is outside "
                        "PostgreSQL's timestamp range", value)
        return _field(struct.pack(">q", pg))

    def _array(self, plan, bodies) -> bytes:
        head = struct.pack(">iiIii", 1, 0, OIDS[plan.base], len(bodies), 1)
        return _field(head + b"".join(bodies))

    def _value(self, plan, rec, row) -> bytes:
        if plan.type == "text":
            return _field(plan.text)
        if self._is_null(plan, rec):
            return NULL
        if plan.type == "text_lookup":
            key = int(rec[plan.source.name])
            text = plan.table.get(key, plan.default)
            if text is None:
                self._error(plan, row, f"no text for key {key} and no default", key)
            return _field(text)
        if plan.base == "numeric":
            scale = self._scale(plan, rec, row)
            if plan.is_array:
                return self._array(plan, [
                    _field(numeric_send(Decimal(int(v)).scaleb(-scale)))
                    for v in rec[plan.source.name]])
            return _field(numeric_send(Decimal(int(rec[plan.source.name])).scaleb(-scale)))
        if plan.base == "timestamptz":
            return self._timestamp(plan, int(rec[plan.source.name]), row)
        if plan.is_array:
            return self._array(plan, [self._int(plan, int(v), row, i)
                                      for i, v in enumerate(rec[plan.source.name])])
        return self._int(plan, int(rec[plan.source.name]), row)

    def _row(self, rec, row) -> bytes:
        return struct.pack(">h", len(self.plans)) + b"".join(
            self._value(plan, rec, row) for plan in self.plans)

    def _check(self, array, start, stop):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"expected a numpy array, got {type(array).__name__}")
        if array.dtype != self.dtype:
            raise TypeError(f"array dtype {array.dtype} is not the encoder's dtype {self.dtype}")
        if array.ndim != 1:
            raise ValueError(f"expected a 1-d array of rows, got {array.ndim} dimensions")
        stop = len(array) if stop is None else stop
        if not 0 <= start <= stop <= len(array):
            raise IndexError(f"rows {start}:{stop} outside an array of {len(array)} rows")
        return stop

    # -- the core's API ---------------------------------------------------------

    def encode(self, array, start=0, stop=None) -> bytes:
        stop = self._check(array, start, stop)
        return HEADER + b"".join(self._row(array[r], r) for r in range(start, stop)) + TRAILER

    def begin(self):
        self._buf = bytearray(HEADER)
        self.rows = 0

    def encode_rows(self, array, start=0, stop=None) -> int:
        stop = self._check(array, start, stop)
        for r in range(start, stop):
            self._buf += self._row(array[r], r)   # a refused row appends nothing
            self.rows += 1
        return stop - start

    def end(self):
        self._buf += TRAILER

    def clear(self, release=False):
        self._buf = bytearray()

    def take(self) -> bytes:
        data, self._buf = bytes(self._buf), bytearray()
        return data

    @property
    def nbytes(self) -> int:
        return len(self._buf)
