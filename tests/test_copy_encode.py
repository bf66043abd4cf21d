"""Binary COPY encoding: the core against its twin, and round trips through PostgreSQL.

The compiled ``CopyEncoder`` must produce the twin's payloads byte for byte
(hypothesis, random values including every edge), and a real PostgreSQL must
accept the payloads and give back exactly what went in: values read back by
psycopg, and, for unconstrained column types, the server's own binary COPY
output equal to the payload sent (which also proves the numerics canonical).
"""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor._core import CopyEncoder
from ingestor.pipeline.copyspec import (
    PG_END_TIMESTAMP,
    PG_EPOCH_SHIFT_US,
    PG_MIN_TIMESTAMP,
    CopyEncodeError,
    parse_columns,
)
from ingestor.twin.copy import HEADER, TRAILER, numeric_send
from ingestor.twin.copy import CopyEncoder as TwinEncoder

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
EXCHANGES = {1: "NSE", 2: "NFO", 3: "CDS", 4: "BSE", 5: "BFO", 6: "BCD", 7: "MCX",
             8: "MCX-SX", 9: "INDICES", 12: "NCO"}

# -- a dtype and columns that exercise every type, option and source width ----

SINK_DTYPE = np.dtype([
    ("t_us", "<i8"), ("t_s", "<u4"), ("t_ns", "<i8"), ("t_ms", ">i8"),
    ("i1", "i1"), ("u1", "u1"), ("i2", "<i2"), ("u2", "<u2"), ("i4", "<i4"), ("u4", "<u4"),
    ("i8", "<i8"), ("u8", "<u8"), ("be4", ">i4"), ("be2", ">u2"),
    ("div", "<u4"), ("flags", "u1"), ("seg", "u1"), ("vwap_e7", "<i8"),
    ("arr_u4", ("<u4", (5,))), ("arr_u2", ("<u2", (5,))), ("arr_i8", ("<i8", (3,))),
])

SINK_COLUMNS = [
    ("c_ts", "timestamptz_us", {"field": "t_us"}),
    ("c_ts_s", "timestamptz_s", {"field": "t_s", "null_if_zero": True}),
    ("c_ts_ns", "timestamptz_ns", {"field": "t_ns"}),
    ("c_ts_ms", "timestamptz_ms", {"field": "t_ms"}),
    ("c_i2", "int2", {"field": "i2"}),
    ("c_i2u", "int2", {"field": "u2"}),
    ("c_i2b", "int2", {"field": "be2"}),
    ("c_i1", "int2", {"field": "i1", "null_if_flag": ("flags", 0x02)}),
    ("c_u1", "int4", {"field": "u1"}),
    ("c_i4", "int4", {"field": "u4"}),
    ("c_i4s", "int4", {"field": "i8"}),
    ("c_i4b", "int4", {"field": "be4"}),
    ("c_i8", "int8", {"field": "u8"}),
    ("c_i8s", "int8", {"field": "i8", "null_unless_flag": ("flags", 0x01)}),
    ("c_num", "numeric", {"field": "u4", "divisor_field": "div"}),
    ("c_num_i8", "numeric", {"field": "i8", "divisor": 10_000}),
    ("c_num_u8", "numeric", {"field": "u8", "scale": 19}),
    ("c_num_s3", "numeric", {"field": "i4", "scale": 3, "null_if_zero": True}),
    ("c_vwap", "numeric", {"field": "vwap_e7", "scale": 7}),
    ("c_num0", "numeric", {"field": "i8"}),
    ("c_ex", "text_lookup", {"field": "seg", "table": EXCHANGES, "default": "SEG{}"}),
    ("c_tf", "text_lookup", {"field": "u2", "table": {0: "1s", 1: "5s", 7: "1d"}}),
    ("c_tfd", "text_lookup", {"field": "i4", "table": {-2: "minus two", 5: "five"},
                              "default": "other"}),
    ("c_const", "text", {"value": "héllo"}),
    ("c_arr_num", "numeric[]", {"field": "arr_u4", "divisor_field": "div"}),
    ("c_arr_num2", "numeric[]", {"field": "arr_i8", "scale": 2}),
    ("c_arr_i4", "int4[]", {"field": "arr_u2"}),
    ("c_arr_i8", "int8[]", {"field": "arr_u4"}),
    ("c_arr_i2", "int2[]", {"field": "arr_i8"}),
]

SINK_SQL_TYPES = {
    "timestamptz": "timestamptz", "int2": "smallint", "int4": "integer", "int8": "bigint",
    "numeric": "numeric", "text_lookup": "text", "text": "text", "numeric[]": "numeric[]",
    "int4[]": "integer[]", "int8[]": "bigint[]", "int2[]": "smallint[]",
}

DIVISORS = [1, 10, 100, 1000, 10_000, 10**7, 10**9, 1_000_000_000, 0, 3, 1001, 2**32 - 1]
# (PostgreSQL's last valid µs since the Unix epoch is past 2^63 - 1: an int64 field cannot
# reach it; test_timestamps_round_trip sends it from a uint64 field.)
TS_EDGES_US = [0, 1, -1, PG_MIN_TIMESTAMP + PG_EPOCH_SHIFT_US, 2**63 - 1,
               PG_MIN_TIMESTAMP + PG_EPOCH_SHIFT_US - 1, 1_700_000_000_123_456]


def _edges(dtype: np.dtype) -> list[int]:
    info = np.iinfo(dtype)
    vals = {0, 1, info.max, info.min, info.max - 1, 9999, 10000, 10001, 99_990_000}
    if info.min < 0:
        vals |= {-1, -9999, -10000, info.min + 1}
    return sorted(v for v in vals if info.min <= v <= info.max)


#: Per field, the values every column made of it accepts (the rest get refused).
SAFE = {"t_ms": (-10**15, 10**15), "u2": (0, 1), "be2": (0, 2**15 - 1), "u4": (0, 2**31 - 1),
        "i8": (-(2**31), 2**31 - 1), "u8": (0, 2**63 - 1), "arr_i8": (-(2**15), 2**15 - 1),
        "t_us": (PG_MIN_TIMESTAMP + PG_EPOCH_SHIFT_US, 2**63 - 1)}


def _field_values(name: str, base: np.dtype):
    """Mostly values the field's columns accept, edges included; now and then anything."""
    info = np.iinfo(base)
    lo, hi = SAFE.get(name, (info.min, info.max))
    if name == "div":
        safe = st.sampled_from(DIVISORS[:8])
        anything = st.sampled_from(DIVISORS)
    elif name == "flags":
        return st.integers(0, 3)
    elif name == "seg":
        return st.one_of(st.sampled_from(sorted(EXCHANGES)), st.integers(0, 255))
    else:
        edges = [e for e in _edges(base) + [-999, -1000, -1001, 1999] + TS_EDGES_US
                 if lo <= e <= hi]
        safe = st.one_of(st.sampled_from(sorted(set(edges)) + [lo, hi]), st.integers(lo, hi),
                         st.integers(max(lo, -100_000), min(hi, 100_000)))
        anything = st.one_of(st.sampled_from(_edges(base)), st.integers(info.min, info.max))
    return st.integers(0, 39).flatmap(lambda k: anything if k == 0 else safe)


@st.composite
def sink_arrays(draw, max_rows=12):
    n = draw(st.integers(0, max_rows))
    arr = np.zeros(n, SINK_DTYPE)
    for name in SINK_DTYPE.names:
        sub = SINK_DTYPE.fields[name][0]
        base, shape = sub.subdtype if sub.subdtype else (sub, ())
        count = int(np.prod(shape)) if shape else 1
        values = draw(st.lists(_field_values(name, base), min_size=n * count, max_size=n * count))
        arr[name] = np.array(values, dtype=base.newbyteorder("=")).reshape((n,) + shape)
    return arr


def _outcome(encoder, arr, start=0, stop=None):
    try:
        return ("ok", encoder.encode(arr, start, stop))
    except CopyEncodeError as exc:
        return ("error", exc.column, exc.row, exc.value)


CORE = CopyEncoder(SINK_DTYPE, SINK_COLUMNS)
TWIN = TwinEncoder(SINK_DTYPE, SINK_COLUMNS)


# -- the core against its twin --------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sink_arrays())
def test_core_equals_twin(arr):
    assert _outcome(CORE, arr) == _outcome(TWIN, arr)
    for i in range(len(arr)):       # rows after a refused one are compared too
        assert _outcome(CORE, arr, i, i + 1) == _outcome(TWIN, arr, i, i + 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sink_arrays(max_rows=20), st.data())
def test_stream_with_skips_equals_twin(arr, data):
    """Streaming in random chunks, skipping refused rows, gives the twin's bytes."""
    def run(enc):
        enc.begin()
        out, skipped, r = [], [], 0
        while r < len(arr):
            stop = min(len(arr), r + data.draw(st.integers(1, 7), label="chunk"))
            try:
                enc.encode_rows(arr, r, stop)
                r = stop
            except CopyEncodeError as exc:
                assert r <= exc.row < stop
                skipped.append((exc.column, exc.row))
                r = exc.row + 1
            if data.draw(st.booleans(), label="flush"):
                out.append(enc.take())
        enc.end()
        out.append(enc.take())
        return b"".join(out), skipped, enc.rows

    core = run(CORE)
    assert core == run(TWIN)
    assert core[2] == len(arr) - len(core[1])


@settings(max_examples=500, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1), st.integers(0, 19))
def test_numeric_scalar_equals_twin(raw, scale):
    dtype = np.dtype([("v", "<i8" if raw < 2**63 else "<u8")])
    enc = CopyEncoder(dtype, [("v", "numeric", {"scale": scale})])
    arr = np.array([(raw,)], dtype)
    body = numeric_send(Decimal(raw).scaleb(-scale))
    assert enc.encode(arr) == HEADER + struct.pack(">hi", 1, len(body)) + body + TRAILER


def test_numeric_known_encodings():
    dtype = np.dtype([("v", "<u4"), ("d", "<u4")])
    enc = CopyEncoder(dtype, [("v", "numeric", {"divisor_field": "d"})])

    def body(raw, div):
        payload = enc.encode(np.array([(raw, div)], dtype))
        return payload[len(HEADER) + 6:-2]

    # 1573.70: digits 1573, 7000; weight 0; dscale 2.
    assert body(157370, 100) == struct.pack(">hhHh2H", 2, 0, 0, 2, 1573, 7000)
    # Zero: no digits, weight 0, the divisor's scale kept.
    assert body(0, 100) == struct.pack(">hhHh", 0, 0, 0, 2)
    # 42949672.95 (0xFFFFFFFF / 100): 4294, 9672, 9500.
    assert body(0xFFFFFFFF, 100) == struct.pack(">hhHh3H", 3, 1, 0, 2, 4294, 9672, 9500)
    # CDS: 0.0000001 = 10 * 10000^-2 -> weight -2, one digit 10, dscale 7.
    assert body(1, 10**7) == struct.pack(">hhHh1H", 1, -2, 0, 7, 10)
    # 0.8234567 = 8234 * 10000^-1 + 5670 * 10000^-2.
    assert body(8234567, 10**7) == struct.pack(">hhHh2H", 2, -1, 0, 7, 8234, 5670)
    # 10000 exactly: one digit 1 of weight 1 (trailing zero digit stripped).
    assert body(10000, 1) == struct.pack(">hhHh1H", 1, 1, 0, 0, 1)


# -- errors and the buffer ---------------------------------------------------------

TICKISH = np.dtype([("q", "<u4"), ("p", "<u4"), ("d", "<u4"), ("seg", "u1")])
TICKISH_COLUMNS = [("qty", "int4", {"field": "q"}), ("price", "numeric", {"field": "p", "divisor_field": "d"}),
                   ("ex", "text_lookup", {"field": "seg", "table": {1: "NSE"}})]


def _tickish(rows):
    return np.array(rows, TICKISH)


def test_out_of_range_names_the_column():
    enc = CopyEncoder(TICKISH, TICKISH_COLUMNS)
    arr = _tickish([(5, 1, 100, 1), (2**31, 1, 100, 1)])
    with pytest.raises(CopyEncodeError, match=r"column 'qty' \(int4\), row 1: value 2147483648 out of range") as ei:
        enc.encode(arr)
    assert (ei.value.column, ei.value.row, ei.value.value) == ("qty", 1, 2**31)
    assert enc.encode(arr, 0, 1) == TwinEncoder(TICKISH, TICKISH_COLUMNS).encode(arr, 0, 1)


@pytest.mark.parametrize("rows, column, value, message", [
    ([(1, 1, 300, 1)], "price", 300, "divisor 300"),
    ([(1, 1, 0, 1)], "price", 0, "divisor 0"),
    ([(1, 1, 100, 9)], "ex", 9, "no text for key 9"),
])
def test_refusals(rows, column, value, message):
    for enc in (CopyEncoder(TICKISH, TICKISH_COLUMNS), TwinEncoder(TICKISH, TICKISH_COLUMNS)):
        with pytest.raises(CopyEncodeError, match=message) as ei:
            enc.encode(_tickish(rows))
        assert (ei.value.column, ei.value.row, ei.value.value) == (column, 0, value)


def test_array_element_out_of_range():
    dtype = np.dtype([("a", "<u4", (3,))])
    enc = CopyEncoder(dtype, [("a", "int4[]")])
    with pytest.raises(CopyEncodeError, match=r"row 0, element 2: value 4294967295"):
        enc.encode(np.array([([1, 2, 2**32 - 1],)], dtype))


def test_timestamp_out_of_range():
    dtype = np.dtype([("t", "<i8")])
    enc = CopyEncoder(dtype, [("t", "timestamptz_s")])
    ok = np.array([(-210866803200,), (9224318015999,)], dtype)  # 4714-11-24 BC .. 294276-12-31
    assert enc.encode(ok) == TwinEncoder(dtype, [("t", "timestamptz_s")]).encode(ok)
    for bad in (-210866803201, 9224318016000, 2**63 - 1, -(2**63)):
        with pytest.raises(CopyEncodeError, match="outside PostgreSQL's timestamp range"):
            enc.encode(np.array([(bad,)], dtype))


def test_failed_row_leaves_the_stream_buffer_intact():
    enc = CopyEncoder(TICKISH, TICKISH_COLUMNS)
    twin = TwinEncoder(TICKISH, TICKISH_COLUMNS)
    rows = [(i, 1000 + i, 100, 1) for i in range(600)]
    rows[450] = (2**32 - 1, 1, 100, 1)          # refused: int4 overflow
    arr = _tickish(rows)
    enc.begin()
    enc.encode_rows(arr, 0, 10)
    before = bytes(memoryview(enc))
    with pytest.raises(CopyEncodeError) as ei:
        enc.encode_rows(arr, 10)                  # big enough to run without the GIL
    assert ei.value.row == 450 and enc.rows == 450
    # The buffer holds the header and rows 0..449, complete, nothing of row 450.
    assert bytes(memoryview(enc)) == twin.encode(arr, 0, 450)[:-2]
    assert bytes(memoryview(enc)).startswith(before)
    enc.encode_rows(arr, 451)
    enc.end()
    expected = twin.encode(arr, 0, 450)[:-2] + twin.encode(arr, 451)[len(HEADER):]
    assert enc.take() == expected
    assert enc.rows == 599


def test_exported_buffer_cannot_change():
    enc = CopyEncoder(TICKISH, TICKISH_COLUMNS)
    enc.begin()
    view = memoryview(enc)
    assert view.readonly and bytes(view) == HEADER
    for call in (enc.begin, enc.end, enc.clear, enc.take,
                 lambda: enc.encode_rows(_tickish([(1, 1, 100, 1)]))):
        with pytest.raises(BufferError):
            call()
    view.release()
    enc.encode_rows(_tickish([(1, 1, 100, 1)]))
    enc.end()
    assert enc.take() == TwinEncoder(TICKISH, TICKISH_COLUMNS).encode(_tickish([(1, 1, 100, 1)]))
    assert enc.nbytes == 0 and enc.capacity > 0
    enc.clear(release=True)
    assert enc.capacity == 0 and bytes(memoryview(enc)) == b""


def test_stream_state_and_inputs():
    enc = CopyEncoder(TICKISH, TICKISH_COLUMNS)
    arr = _tickish([(1, 1, 100, 1)])
    with pytest.raises(RuntimeError, match="begin"):
        enc.encode_rows(arr)
    with pytest.raises(TypeError, match="dtype"):
        enc.encode(np.zeros(2, np.dtype([("q", "<u4")])))
    with pytest.raises(IndexError):
        enc.encode(arr, 0, 2)
    with pytest.raises(TypeError):
        enc.encode([1, 2])
    assert enc.encode(arr[:0]) == HEADER + TRAILER
    # Strided views (every other row, reversed) encode like their copies.
    big = _tickish([(i, i, 100, 1) for i in range(40)])
    assert enc.encode(big[::2]) == enc.encode(np.ascontiguousarray(big[::2]))
    assert enc.encode(big[::-3]) == TwinEncoder(TICKISH, TICKISH_COLUMNS).encode(big[::-3])


@pytest.mark.parametrize("columns, message", [
    ([("x", "float8")], "unknown type"),
    ([("q", "int4", {"bogus": 1})], "unknown option"),
    ([("nope", "int4")], "no field 'nope'"),
    ([("p", "numeric", {"divisor": 300})], "not a power of ten"),
    ([("p", "numeric", {"divisor": 100, "scale": 2})], "one of"),
    ([("p", "int4[]")], "subarray"),
    ([("q", "text_lookup", {"table": {1: "a"}, "default": "X{}"})], "1-byte field"),
    ([("seg", "text_lookup", {"table": {300: "a"}})], "cannot occur"),
    ([("q", "int4", {"null_unless_flag": ("seg", 0x100)})], "mask"),
    ([("c", "text")], "value"),
    ([], "no columns"),
])
def test_bad_specs(columns, message):
    with pytest.raises(ValueError, match=message):
        parse_columns(TICKISH, columns)
    with pytest.raises(ValueError, match=message):
        CopyEncoder(TICKISH, columns)


# -- round trips through PostgreSQL ----------------------------------------------------

def _copy_in(conn, enc, table, *payloads):
    with conn.cursor().copy(enc.copy_sql(table)) as copy:
        for payload in payloads:
            copy.write(payload)


def _copy_out(conn, table, columns) -> bytes:
    cols = ", ".join(f'"{c}"' for c in columns)
    out = bytearray()
    with conn.cursor().copy(f"COPY (SELECT {cols} FROM {table} ORDER BY seq) TO STDOUT (FORMAT BINARY)") as copy:
        for chunk in copy:
            out += chunk
    return bytes(out)


def _sink_table(conn, name):
    cols = ", ".join(f'"{p.name}" {SINK_SQL_TYPES[p.type]}' for p in CORE.plans)
    conn.execute(f"CREATE TABLE {name} (seq bigserial, {cols})")


def test_sink_echo_through_postgres(pg_dsn, rng):
    """Random rows of every type: the server's binary COPY output is our payload."""
    # Values mostly inside what every column made of the field accepts (its
    # edges included), now and then anything the field can hold.
    safe = dict(SAFE, t_us=(-10**16, 10**16))
    arr = np.zeros(3000, SINK_DTYPE)
    for name in SINK_DTYPE.names:
        sub = SINK_DTYPE.fields[name][0]
        base = (sub.subdtype[0] if sub.subdtype else sub).newbyteorder("=")
        info = np.iinfo(base)
        lo, hi = safe.get(name, (info.min, info.max))
        edges = [e for e in _edges(base) if lo <= e <= hi] + [lo, hi]
        flat = arr[name].reshape(-1)
        for i in range(flat.size):
            if name == "div":
                flat[i] = rng.choice(DIVISORS[:8])
            elif name == "t_us":
                flat[i] = rng.choice(TS_EDGES_US[:5] + [rng.randrange(-10**16, 10**16)])
            elif rng.random() < 0.0005:
                flat[i] = rng.randint(info.min, info.max)
            elif rng.random() < 0.3:
                flat[i] = rng.choice(edges)
            else:
                flat[i] = rng.randint(lo, hi)
    # Refused rows (out of range for their column) are skipped, as the writer would.
    enc = CopyEncoder(SINK_DTYPE, SINK_COLUMNS)
    enc.begin()
    chunks, kept, r = [], [], 0
    while r < len(arr):
        try:
            enc.encode_rows(arr, r)
            kept.extend(range(r, len(arr)))
            r = len(arr)
        except CopyEncodeError as exc:
            kept.extend(range(r, exc.row))
            r = exc.row + 1
        chunks.append(enc.take())
    enc.end()
    chunks.append(enc.take())
    payload = b"".join(chunks)
    assert payload == TWIN.encode(arr[kept])
    assert 2000 < len(kept) < len(arr)
    with psycopg.connect(pg_dsn) as conn:
        # the run's database is shared: a table left by an earlier run of this test goes
        conn.execute("DROP TABLE IF EXISTS copy_sink")
        _sink_table(conn, "copy_sink")
        _copy_in(conn, enc, "copy_sink", *chunks)
        assert conn.execute("SELECT count(*) FROM copy_sink").fetchone()[0] == len(kept)
        assert _copy_out(conn, "copy_sink", CORE.columns) == payload


def _ts(us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=us)


TICK_DTYPE_T = np.dtype([
    ("time_us", "<i8"), ("instrument_id", "<u4"), ("segment", "u1"), ("flags", "u1"),
    ("divisor", "<u4"), ("last_price", "<u4"), ("quantity", "<u4"), ("volume", "<u4"),
    ("bid_price", "<u4"), ("exchange_ts", "<u4"), ("vwap_e7", "<i8"),
])
F_QTY, F_DEPTH = 0x01, 0x02
TICK_COLUMNS = [
    ("time", "timestamptz_us", {"field": "time_us"}),
    ("instrument_id", "int4"),
    ("exchange", "text_lookup", {"field": "segment", "table": EXCHANGES, "default": "SEG{}"}),
    ("price", "numeric", {"field": "last_price", "divisor_field": "divisor"}),
    ("quantity", "int8", {"null_unless_flag": ("flags", F_QTY)}),
    ("volume", "int8", {"null_unless_flag": ("flags", F_QTY)}),
    ("bid_price", "numeric", {"divisor_field": "divisor", "null_unless_flag": ("flags", F_DEPTH)}),
    ("exchange_time", "timestamptz_s", {"field": "exchange_ts", "null_if_zero": True}),
    ("vwap", "numeric", {"field": "vwap_e7", "scale": 7}),
]


def test_contract_columns_round_trip(pg_dsn):
    """NUMERIC(18,7) prices come back as exactly raw / divisor; nulls by rule."""
    rows = [
        # time, id, seg, flags, divisor, price, qty, vol, bid, exch_ts, vwap_e7
        (1_700_000_000_000_000, 256265, 9, 0, 100, 0, 0, 0, 0, 0, 0),
        (1_700_000_000_000_001, 408065, 1, F_QTY | F_DEPTH, 100, 1, 7, 10, 157370, 1_700_000_000, 15_737_000_000),
        (1_700_000_000_000_002, 408065, 1, F_QTY, 100, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 5, 1, 429_496_729_500_000_000),
        (1_700_000_000_000_003, 2_000_003, 3, F_QTY | F_DEPTH, 10**7, 823_456_7, 1, 2, 0xFFFFFFFF, 1_700_000_001, 1),
        (1_700_000_000_000_004, 2_000_006, 6, F_DEPTH, 10_000, 123_456_789, 0, 0, 10_000, 0, -15_737_000_001),
        (-1, 2**31 - 1, 200, F_QTY | F_DEPTH, 100, 99_999, 3, 4, 1, 4_294_967_295, -1),
    ]
    arr = np.array(rows, TICK_DTYPE_T)
    enc = CopyEncoder(TICK_DTYPE_T, TICK_COLUMNS)
    payload = enc.encode(arr)
    assert payload == TwinEncoder(TICK_DTYPE_T, TICK_COLUMNS).encode(arr)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("""CREATE TABLE copy_ticks (
            time timestamptz NOT NULL, instrument_id integer NOT NULL, exchange text NOT NULL,
            price numeric(18,7) NOT NULL, quantity bigint, volume bigint, bid_price numeric(18,7),
            exchange_time timestamptz, vwap numeric(18,7))""")
        _copy_in(conn, enc, "copy_ticks", payload)
        got = conn.execute("SELECT * FROM copy_ticks ORDER BY time").fetchall()
    assert len(got) == len(rows)
    for g, r in zip(got, sorted(rows)):
        t, iid, seg, flags, div, price, qty, vol, bid, ets, vwap = r
        assert g[0] == _ts(t)
        assert g[1] == iid
        assert g[2] == EXCHANGES.get(seg, f"SEG{seg}")
        assert g[3] == Decimal(price) / Decimal(div)
        assert g[3].as_tuple().exponent == -7            # the column's scale
        assert (g[4], g[5]) == ((qty, vol) if flags & F_QTY else (None, None))
        assert g[6] == (Decimal(bid) / Decimal(div) if flags & F_DEPTH else None)
        assert g[7] == (_ts(ets * 10**6) if ets else None)
        assert g[8] == Decimal(vwap).scaleb(-7)
    by_time = {g[0]: g for g in got}
    assert by_time[_ts(1_700_000_000_000_002)][3] == Decimal("42949672.95")
    cds = by_time[_ts(1_700_000_000_000_003)]
    assert (cds[2], cds[3], cds[6]) == ("CDS", Decimal("0.8234567"), Decimal("429.4967295"))


def test_unconstrained_numeric_keeps_the_divisor_scale(pg_dsn):
    dtype = np.dtype([("seq", "<i8"), ("p", "<u4"), ("d", "<u4")])
    enc = CopyEncoder(dtype, [("seq", "int8"), ("p", "numeric", {"divisor_field": "d"})])
    cases = [(0, 100, "0.00"), (1, 100, "0.01"), (157370, 100, "1573.70"), (0xFFFFFFFF, 100, "42949672.95"),
             (1, 10**7, "0.0000001"), (0xFFFFFFFF, 10**7, "429.4967295"), (0, 10**7, "0.0000000"),
             (10000, 10_000, "1.0000"), (123450000, 10_000, "12345.0000"), (5, 1, "5")]
    arr = np.array([(i, p, d) for i, (p, d, _) in enumerate(cases)], dtype)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE copy_num (seq bigint, p numeric)")
        _copy_in(conn, enc, "copy_num", enc.encode(arr))
        got = [r[0] for r in conn.execute("SELECT p FROM copy_num ORDER BY seq")]
        text = [r[0] for r in conn.execute("SELECT p::text FROM copy_num ORDER BY seq")]
        assert _copy_out(conn, "copy_num", ["seq", "p"]) == enc.encode(arr)
    # Same value and same scale (Decimal's tuple holds the exponent).
    assert [g.as_tuple() for g in got] == [(Decimal(p) / Decimal(d)).quantize(Decimal(1).scaleb(-len(str(d)) + 1)).as_tuple()
                                           for p, d, _ in cases]
    assert text == [c[2] for c in cases]


def test_integer_extremes_round_trip(pg_dsn):
    dtype = np.dtype([("seq", "<i8"), ("a", "<i2"), ("b", "<i4"), ("c", "<i8"), ("u", "<u4")])
    enc = CopyEncoder(dtype, [("seq", "int8"), ("a", "int2"), ("b", "int4"), ("c", "int8"),
                              ("u", "int8")])
    rows = [(0, -(2**15), -(2**31), -(2**63), 0), (1, 2**15 - 1, 2**31 - 1, 2**63 - 1, 2**32 - 1),
            (2, 0, 0, 0, 1), (3, -1, -1, -1, 2**31)]
    arr = np.array(rows, dtype)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE copy_ints (seq bigint, a smallint, b integer, c bigint, u bigint)")
        _copy_in(conn, enc, "copy_ints", enc.encode(arr))
        assert conn.execute("SELECT * FROM copy_ints ORDER BY seq").fetchall() == rows


def test_snapshot_arrays_round_trip(pg_dsn):
    """numeric(18,7)[] / bigint[] / integer[] books, all-zero levels kept as zeros."""
    dtype = np.dtype([("time_us", "<i8"), ("instrument_id", "<u4"), ("divisor", "<u4"),
                      ("bid_price", "<u4", (5,)), ("bid_quantity", "<u4", (5,)),
                      ("bid_orders", "<u2", (5,)), ("total_bid", "<u8")])
    columns = [("time", "timestamptz_us", {"field": "time_us"}), ("instrument_id", "int4"),
               ("bid_prices", "numeric[]", {"field": "bid_price", "divisor_field": "divisor"}),
               ("bid_quantities", "int8[]", {"field": "bid_quantity"}),
               ("bid_orders", "int4[]"),
               ("total_bid_quantity", "int8", {"field": "total_bid"})]
    rows = [
        (1, 1, 100, [0] * 5, [0] * 5, [0] * 5, 0),
        (2, 2, 100, [157370, 157365, 1, 0xFFFFFFFF, 0], [1, 2, 3, 0xFFFFFFFF, 0], [1, 65535, 0, 2, 0], 2**40),
        (3, 3, 10**7, [8234567, 1, 0, 0, 0], [10] * 5, [3] * 5, 50),
    ]
    arr = np.array(rows, dtype)
    enc = CopyEncoder(dtype, columns)
    payload = enc.encode(arr)
    assert payload == TwinEncoder(dtype, columns).encode(arr)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("""CREATE TABLE copy_books (time timestamptz, instrument_id integer,
            bid_prices numeric(18,7)[5], bid_quantities bigint[5], bid_orders integer[5],
            total_bid_quantity bigint)""")
        _copy_in(conn, enc, "copy_books", payload)
        got = conn.execute("SELECT * FROM copy_books ORDER BY time").fetchall()
        dims = conn.execute("SELECT DISTINCT array_dims(bid_prices), array_dims(bid_orders) "
                            "FROM copy_books").fetchall()
    assert dims == [("[1:5]", "[1:5]")]
    for g, (t, iid, div, bp, bq, bo, tb) in zip(got, rows):
        assert g[0] == _ts(t) and g[1] == iid
        assert g[2] == [Decimal(p) / Decimal(div) for p in bp]
        assert g[3] == bq and g[4] == bo and g[5] == tb
    assert got[0][2] == [Decimal(0)] * 5


def test_timestamps_round_trip(pg_dsn):
    dtype = np.dtype([("seq", "<i8"), ("us", "<i8"), ("ns", "<i8"), ("s", "<u4")])
    enc = CopyEncoder(dtype, [("seq", "int8"), ("a", "timestamptz_us", {"field": "us"}),
                              ("b", "timestamptz_ns", {"field": "ns"}),
                              ("c", "timestamptz_s", {"field": "s"})])
    rows = [(0, 0, 0, 0), (1, -1, -1, 1), (2, 1_700_000_000_123_456, 1_700_000_000_123_456_789, 2**32 - 1),
            (3, -62_135_596_800_000_000, -1001, 946_684_800),
            (4, 253_402_300_799_999_999, 2**63 - 1, 1_700_000_000)]
    arr = np.array(rows, dtype)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE copy_ts (seq bigint, a timestamptz, b timestamptz, c timestamptz)")
        _copy_in(conn, enc, "copy_ts", enc.encode(arr))
        got = conn.execute("SELECT a, b, c FROM copy_ts ORDER BY seq").fetchall()
        # The range's ends are accepted too (beyond Python's datetime: compare as
        # µs since 2000 and as text).  The last one only fits a uint64 field.
        edge_dtype = np.dtype([("seq", "<i8"), ("us", "<u8")])
        edge_cols = [("seq", "int8"), ("a", "timestamptz_us", {"field": "us"})]
        edge_enc = CopyEncoder(edge_dtype, edge_cols)
        last = PG_END_TIMESTAMP + PG_EPOCH_SHIFT_US - 1
        assert last > 2**63 - 1
        _copy_in(conn, edge_enc, "copy_ts", edge_enc.encode(np.array([(10, last)], edge_dtype)))
        first = np.array([(9, PG_MIN_TIMESTAMP + PG_EPOCH_SHIFT_US, 0, 0)], dtype)
        _copy_in(conn, enc, "copy_ts", enc.encode(first))
        ends = conn.execute("SELECT (extract(epoch FROM a - '2000-01-01 UTC'::timestamptz) * 1000000)::bigint, "
                            "a::text FROM copy_ts WHERE seq >= 9 ORDER BY seq").fetchall()
        with pytest.raises(CopyEncodeError):
            edge_enc.encode(np.array([(11, last + 1)], edge_dtype))
        edge = np.array([(10, last)], edge_dtype)
        assert TwinEncoder(edge_dtype, edge_cols).encode(edge) == edge_enc.encode(edge)
    for g, (_, us, ns, s) in zip(got, rows):
        assert g == (_ts(us), _ts(ns // 1000), _ts(s * 10**6))
    assert [e[0] for e in ends] == [PG_MIN_TIMESTAMP, PG_END_TIMESTAMP - 1]
    assert ends[0][1].endswith("BC") and ends[1][1].startswith("294276-12-31 23:59:59.999999")


def test_text_lookup_and_constant_round_trip(pg_dsn):
    dtype = np.dtype([("seq", "<i8"), ("seg", "u1")])
    enc = CopyEncoder(dtype, [("seq", "int8"),
                              ("exchange", "text_lookup", {"field": "seg", "table": EXCHANGES, "default": "SEG{}"}),
                              ("timeframe", "text", {"value": "1m"}), ("note", "text", {"value": "ünïcode ✓"})])
    arr = np.array([(i, s) for i, s in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 0, 10, 255])], dtype)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE copy_text (seq bigint, exchange text, timeframe text, note text)")
        _copy_in(conn, enc, "copy_text", enc.encode(arr))
        got = conn.execute("SELECT exchange, timeframe, note FROM copy_text ORDER BY seq").fetchall()
    assert [g[0] for g in got] == ["NSE", "NFO", "CDS", "BSE", "BFO", "BCD", "MCX", "MCX-SX", "INDICES",
                                   "NCO", "SEG0", "SEG10", "SEG255"]
    assert {g[1:] for g in got} == {("1m", "ünïcode ✓")}


def test_payload_bigger_than_the_scratch_buffer():
    """encode() of a batch past its reusable buffer's limit takes the direct path."""
    dtype = np.dtype([("p", "<u4", (1000,)), ("d", "<u4")])
    enc = CopyEncoder(dtype, [("p", "numeric[]", {"divisor_field": "d"})])
    n = (64 << 20) // enc.max_row_size + 1
    arr = np.zeros(n, dtype)
    arr["d"] = 100
    arr["p"][::97] = np.arange(1000) * 12345
    payload = enc.encode(arr)
    enc.begin()
    enc.encode_rows(arr)
    enc.end()
    assert payload == enc.take()
    small = enc.encode(arr, 0, 3)
    assert small == TwinEncoder(dtype, [("p", "numeric[]", {"divisor_field": "d"})]).encode(arr[:3])
    assert payload.startswith(small[:-2])


def test_encode_from_threads_at_once():
    """encode() runs without the GIL; several threads may share one encoder."""
    from concurrent.futures import ThreadPoolExecutor

    rows = [(i % 70000, 100 + i, 100, 1) for i in range(5000)]
    arrays = [_tickish(rows[k:] + rows[:k]) for k in range(8)]
    enc = CopyEncoder(TICKISH, TICKISH_COLUMNS)
    expected = [enc.encode(a) for a in arrays]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            assert list(pool.map(enc.encode, arrays)) == expected
