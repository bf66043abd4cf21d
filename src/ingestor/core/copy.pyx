# PostgreSQL binary COPY encoding (included by _core.pyx).
#
# Format: PostgreSQL docs, COPY, "Binary Format": an 11-byte signature
# "PGCOPY\n\377\r\n\0", an int32 flags field (0: no OIDs), an int32 header
# extension length (0); then per row an int16 field count and per field an
# int32 length (-1 for NULL) and that many bytes in the type's binary "send"
# form; then an int16 -1 trailer.  All integers are big-endian.
#
# Send forms used here (src/backend/utils/adt/*.c):
#   int2/int4/int8  the integer, 2/4/8 bytes (int2send, int4send, int8send)
#   timestamptz     int64 microseconds since 2000-01-01 00:00 UTC (timestamptz_send)
#   numeric         int16 ndigits, int16 weight, uint16 sign (0x0000 / 0x4000),
#                   int16 dscale, then ndigits int16 base-10000 digits, most
#                   significant first; value = sum(d[i] * 10000^(weight - i))
#                   (numeric_send; leading/trailing zero digits stripped as
#                   numeric.c's strip_var does, zero is ndigits 0, weight 0)
#   text            the UTF-8 bytes (textsend)
#   arrays          int32 ndim, int32 has-nulls flag, uint32 element OID, per
#                   dimension int32 size and int32 lower bound, then per
#                   element int32 length + bytes (array_send); array_recv
#                   refuses an element OID other than the column's.
#
# Rows come from a numpy structured array; what each column is made of is a
# copy_col_t built from ingestor.pipeline.copyspec's plans.  The row loop runs without
# the GIL and creates no Python object; an error is reported through a
# copy_err_t and raised by the caller, after truncating the output back to
# the end of the last complete row (psycopg_c's format_row_binary does the
# same), so a refused row never leaves half a row behind.

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.ref cimport PyObject, Py_XDECREF
from libc.stdint cimport INT64_MAX
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from ingestor.pipeline.copyspec import CopyEncodeError, OIDS, copy_statement, parse_columns

cdef extern from "Python.h":
    # The raw forms, to build a bytes object in place and shrink it once.
    PyObject *PyBytes_FromStringAndSize_raw "PyBytes_FromStringAndSize" (
        const char *v, Py_ssize_t n) except NULL
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t newsize) except -1
    const Py_ssize_t PY_SSIZE_T_MAX


cdef enum:
    COPY_HEADER_SIZE = 19           # signature 11 + flags 4 + extension length 4
    COPY_TRAILER_SIZE = 2
    NUMERIC_MAX_SIZE = 32           # length 4 + header 8 + 10 digits (5 integer + 5 fraction)
    ARRAY_HEADER_SIZE = 20          # ndim, has-nulls, OID, size, lower bound
    NOGIL_ROWS = 256                # release the GIL for batches at least this big
    STREAM_BLOCK_ROWS = 8192        # rows reserved at a time by encode_rows
    SCRATCH_MAX = 64 << 20          # encode() reuses a buffer up to this size

# PostgreSQL's epoch and timestamp range (src/include/datatype/timestamp.h),
# in microseconds; see ingestor.pipeline.copyspec for the same constants.
cdef const int64_t PG_EPOCH_SHIFT_US = 946684800000000
cdef const int64_t PG_MIN_TIMESTAMP = -211813488000000000
cdef const int64_t PG_END_TIMESTAMP = 9223371331200000000

cdef const unsigned char *COPY_SIGNATURE = b"PGCOPY\n\377\r\n\0"
cdef unsigned char _EMPTY[1]

cdef uint64_t _POW10[20]
_POW10[0] = 1
for _i in range(1, 20):
    _POW10[_i] = _POW10[_i - 1] * 10


cdef inline uint64_t _bits(const unsigned char *p, const copy_src_t *s) noexcept nogil:
    """The raw bits of an integer field, zero-extended."""
    if s.size == 1:
        return p[0]
    if s.size == 2:
        return ing_load_u16be(p) if s.big_endian else ing_load_u16le(p)
    if s.size == 4:
        return ing_load_u32be(p) if s.big_endian else ing_load_u32le(p)
    return ing_load_u64be(p) if s.big_endian else ing_load_u64le(p)


cdef inline bint _load(const unsigned char *p, const copy_src_t *s, uint64_t *mag) noexcept nogil:
    """Read an integer field as sign and magnitude: returns True if negative."""
    cdef uint64_t u = _bits(p, s)
    cdef int64_t v
    if not s.is_signed:
        mag[0] = u
        return False
    if s.size == 1:
        v = <int8_t>u
    elif s.size == 2:
        v = <int16_t>u
    elif s.size == 4:
        v = <int32_t>u
    else:
        v = <int64_t>u
    if v < 0:
        mag[0] = (<uint64_t>0) - <uint64_t>v     # well defined for INT64_MIN too
        return True
    mag[0] = <uint64_t>v
    return False


cdef inline bint _fits(uint64_t mag, bint neg, int bits) noexcept nogil:
    # -(2^(bits-1)) <= value <= 2^(bits-1) - 1
    cdef uint64_t half = (<uint64_t>1) << (bits - 1)
    return mag <= half if neg else mag < half


cdef inline int64_t _signed(uint64_t mag, bint neg) noexcept nogil:
    # Only after _fits(mag, neg, 64): two's complement of the magnitude.
    return <int64_t>((<uint64_t>0) - mag) if neg else <int64_t>mag


cdef inline bint _timestamp(uint64_t mag, bint neg, int unit, int64_t *out) noexcept nogil:
    """Unix-epoch time in ``unit`` -> PostgreSQL timestamptz; False if out of range.

    Valid means MIN_TIMESTAMP <= t < END_TIMESTAMP in µs since 2000-01-01;
    both bounds are whole seconds, so for s and ms the check is exact in the
    source unit, before a multiplication that could overflow.
    """
    cdef int64_t v, mul, shift
    if unit == TS_NS:
        # Floor to the microsecond, in sign-magnitude (|value| / 1000 fits int64).
        if neg:
            v = -<int64_t>(mag // 1000 + (1 if mag % 1000 else 0))
        else:
            v = <int64_t>(mag // 1000)
        unit = TS_US
    elif not neg and mag > <uint64_t>INT64_MAX:
        # Past int64: only microseconds can still be valid (END_TIMESTAMP
        # plus the epoch shift exceeds 2^63 - 1).
        if unit == TS_US and mag - <uint64_t>PG_EPOCH_SHIFT_US < <uint64_t>PG_END_TIMESTAMP:
            out[0] = <int64_t>(mag - <uint64_t>PG_EPOCH_SHIFT_US)
            return True
        return False
    else:
        if not _fits(mag, neg, 64):
            return False
        v = _signed(mag, neg)
    if unit == TS_US:
        mul = 1
    elif unit == TS_MS:
        mul = 1000
    else:
        mul = 1000000
    shift = PG_EPOCH_SHIFT_US // mul
    if v < PG_MIN_TIMESTAMP // mul + shift:
        return False
    v -= shift
    if v >= PG_END_TIMESTAMP // mul:
        return False
    out[0] = v * mul
    return True


cdef inline int _scale_of(uint64_t divisor) noexcept nogil:
    """Decimals of a power-of-ten divisor (100 -> 2), -1 if not a power of ten."""
    cdef int s = 0
    while s < 19 and _POW10[s] < divisor:
        s += 1
    return s if _POW10[s] == divisor else -1


cdef inline unsigned char *_put_numeric(unsigned char *p, uint64_t mag, bint neg,
                                        int scale) noexcept nogil:
    """Write the field (length word included) for the decimal mag / 10^scale."""
    cdef uint16_t d[10]
    cdef uint16_t ig[5]
    cdef int ni = 0
    cdef int nf = (scale + 3) >> 2      # base-10000 fraction digits
    cdef int pad, i, start, end, ndigits, weight
    cdef uint64_t ip, fp, m
    if scale > 0:
        ip = mag // _POW10[scale]
        fp = mag % _POW10[scale]
    else:
        ip = mag
        fp = 0
    while ip:
        ig[ni] = <uint16_t>(ip % 10000)
        ip //= 10000
        ni += 1
    for i in range(ni):
        d[i] = ig[ni - 1 - i]
    if nf:
        # The fraction's decimal digits are left-aligned in base-10000 digits:
        # the last one holds (4 - pad) decimals followed by pad zeros.
        pad = nf * 4 - scale
        m = _POW10[4 - pad]
        d[ni + nf - 1] = <uint16_t>((fp % m) * _POW10[pad])
        fp //= m
        i = nf - 2
        while i >= 0:
            d[ni + i] = <uint16_t>(fp % 10000)
            fp //= 10000
            i -= 1
    start = 0
    end = ni + nf
    while start < end and d[start] == 0:
        start += 1
    while end > start and d[end - 1] == 0:
        end -= 1
    ndigits = end - start
    weight = ni - 1 - start if ndigits else 0
    ing_store_i32be(p, 8 + 2 * ndigits)
    ing_store_i16be(p + 4, <int16_t>ndigits)
    ing_store_i16be(p + 6, <int16_t>weight)
    ing_store_u16be(p + 8, 0x4000 if (neg and ndigits) else 0)
    ing_store_i16be(p + 10, <int16_t>scale)
    p += 12
    for i in range(start, end):
        ing_store_u16be(p, d[i])
        p += 2
    return p


cdef inline unsigned char *_put_text(unsigned char *p, const copy_text_t *t) noexcept nogil:
    ing_store_i32be(p, <int32_t>t.length)
    memcpy(p + 4, t.data, t.length)
    return p + 4 + t.length


cdef inline unsigned char *_put_int(unsigned char *p, int kind, uint64_t mag, bint neg) noexcept nogil:
    # The caller checked the range.
    cdef int64_t v = _signed(mag, neg)
    if kind == CK_INT2:
        ing_store_i32be(p, 2)
        ing_store_i16be(p + 4, <int16_t>v)
        return p + 6
    if kind == CK_INT4:
        ing_store_i32be(p, 4)
        ing_store_i32be(p + 4, <int32_t>v)
        return p + 8
    ing_store_i32be(p, 8)
    ing_store_i64be(p + 4, v)
    return p + 12


cdef inline int _int_bits(int kind) noexcept nogil:
    if kind == CK_INT2 or kind == CK_ARR_INT2:
        return 16
    if kind == CK_INT4 or kind == CK_ARR_INT4:
        return 32
    return 64


cdef inline bint _is_null(const copy_col_t *c, const unsigned char *rec) noexcept nogil:
    cdef uint64_t mag
    if c.has_unless and (_bits(rec + c.unless_src.offset, &c.unless_src) & c.unless_mask) == 0:
        return True
    if c.has_if and (_bits(rec + c.if_src.offset, &c.if_src) & c.if_mask) != 0:
        return True
    if c.null_if_zero:
        _load(rec + c.src.offset, &c.src, &mag)
        if mag == 0:
            return True
    return False


cdef inline int _fail(copy_err_t *err, int code, Py_ssize_t elem, uint64_t mag,
                      bint neg) noexcept nogil:
    err.code = code
    err.elem = elem
    err.mag = mag
    err.neg = neg
    return -1


cdef unsigned char *_put_field(const copy_col_t *c, const unsigned char *rec,
                               unsigned char *p, copy_err_t *err) noexcept nogil:
    """Write one field of a row; NULL (with ``err`` set) if the value is refused."""
    cdef uint64_t mag, dmag
    cdef bint neg
    cdef int64_t v
    cdef int scale, bits
    cdef Py_ssize_t i, idx
    cdef const unsigned char *q
    cdef unsigned char *start
    cdef const copy_text_t *t

    if (c.has_unless or c.has_if or c.null_if_zero) and _is_null(c, rec):
        ing_store_i32be(p, -1)
        return p + 4

    if c.kind == CK_TEXT:
        return _put_text(p, &c.text)

    if c.kind == CK_NUMERIC or c.kind == CK_ARR_NUMERIC:
        scale = c.scale
        if scale < 0:
            if _load(rec + c.div.offset, &c.div, &dmag):
                _fail(err, CE_DIVISOR, -1, dmag, True)
                return NULL
            scale = _scale_of(dmag)
            if scale < 0:
                _fail(err, CE_DIVISOR, -1, dmag, False)
                return NULL
        if c.kind == CK_NUMERIC:
            neg = _load(rec + c.src.offset, &c.src, &mag)
            return _put_numeric(p, mag, neg, scale)
        start = p
        p += 4 + ARRAY_HEADER_SIZE
        q = rec + c.src.offset
        for i in range(c.count):
            neg = _load(q, &c.src, &mag)
            p = _put_numeric(p, mag, neg, scale)
            q += c.src.size
        # The array's length is known only now.
        ing_store_i32be(start, <int32_t>(p - start - 4))
        ing_store_i32be(start + 4, 1)
        ing_store_i32be(start + 8, 0)
        ing_store_u32be(start + 12, c.elem_oid)
        ing_store_i32be(start + 16, <int32_t>c.count)
        ing_store_i32be(start + 20, 1)
        return p

    if c.kind == CK_INT2 or c.kind == CK_INT4 or c.kind == CK_INT8:
        neg = _load(rec + c.src.offset, &c.src, &mag)
        if not _fits(mag, neg, _int_bits(c.kind)):
            _fail(err, CE_INT_RANGE, -1, mag, neg)
            return NULL
        return _put_int(p, c.kind, mag, neg)

    if c.kind == CK_TIMESTAMPTZ:
        neg = _load(rec + c.src.offset, &c.src, &mag)
        if not _timestamp(mag, neg, c.ts_unit, &v):
            _fail(err, CE_TS_RANGE, -1, mag, neg)
            return NULL
        ing_store_i32be(p, 8)
        ing_store_i64be(p + 4, v)
        return p + 12

    if c.kind == CK_TEXT_LOOKUP:
        neg = _load(rec + c.src.offset, &c.src, &mag)
        # Keys span at most 2^16 values (checked when parsed), so a key
        # outside int64 is simply a miss.
        idx = -1
        if _fits(mag, neg, 64):
            v = _signed(mag, neg)
            if v >= c.lookup_min and v - c.lookup_min < c.lookup_n:
                idx = <Py_ssize_t>(v - c.lookup_min)
        if idx >= 0 and c.lookup[idx].length >= 0:
            t = &c.lookup[idx]
        elif c.text.length >= 0:
            t = &c.text
        else:
            _fail(err, CE_LOOKUP, -1, mag, neg)
            return NULL
        return _put_text(p, t)

    # Integer arrays: range-check every element before writing it.
    bits = _int_bits(c.kind)
    start = p
    p += 4 + ARRAY_HEADER_SIZE
    q = rec + c.src.offset
    for i in range(c.count):
        neg = _load(q, &c.src, &mag)
        if not _fits(mag, neg, bits):
            _fail(err, CE_INT_RANGE, i, mag, neg)
            return NULL
        p = _put_int(p, c.kind - (CK_ARR_INT2 - CK_INT2), mag, neg)
        q += c.src.size
    ing_store_i32be(start, <int32_t>(p - start - 4))
    ing_store_i32be(start + 4, 1)
    ing_store_i32be(start + 8, 0)
    ing_store_u32be(start + 12, c.elem_oid)
    ing_store_i32be(start + 16, <int32_t>c.count)
    ing_store_i32be(start + 20, 1)
    return p


cdef Py_ssize_t _encode_rows(const copy_col_t *cols, Py_ssize_t ncols, Py_ssize_t max_row,
                             const unsigned char *base, Py_ssize_t stride,
                             Py_ssize_t start, Py_ssize_t stop,
                             unsigned char *out, copy_err_t *err) noexcept nogil:
    """Encode rows ``start:stop`` into ``out`` (room for ``stop - start`` rows of
    ``max_row`` bytes).  Returns the bytes of the complete rows written; on a
    refused row ``err.code`` is set and the count stops before that row."""
    cdef unsigned char *p = out
    cdef unsigned char *row
    cdef const unsigned char *rec
    cdef Py_ssize_t r, j
    err.code = CE_OK
    for r in range(start, stop):
        rec = base + r * stride
        row = p
        ing_store_i16be(p, <int16_t>ncols)
        p += 2
        for j in range(ncols):
            p = _put_field(&cols[j], rec, p, err)
            if p == NULL:
                err.col = j
                err.row = r
                return row - out        # back to the end of the last complete row
        if INGESTOR_DEBUG:
            if p - row > max_row:
                abort()
    return p - out


cdef inline unsigned char *_put_header(unsigned char *p) noexcept nogil:
    memcpy(p, COPY_SIGNATURE, 11)
    ing_store_i32be(p + 11, 0)          # flags: no OIDs
    ing_store_i32be(p + 15, 0)          # header extension length
    return p + COPY_HEADER_SIZE


cdef _src(copy_src_t *s, ref):
    s.offset = ref.offset
    s.size = ref.size
    s.is_signed = ref.signed
    s.big_endian = ref.big_endian


_KINDS = {"int2": CK_INT2, "int4": CK_INT4, "int8": CK_INT8, "timestamptz": CK_TIMESTAMPTZ,
          "numeric": CK_NUMERIC, "text": CK_TEXT, "text_lookup": CK_TEXT_LOOKUP,
          "int2[]": CK_ARR_INT2, "int4[]": CK_ARR_INT4, "int8[]": CK_ARR_INT8,
          "numeric[]": CK_ARR_NUMERIC}
_TS_UNITS = {"s": TS_S, "ms": TS_MS, "us": TS_US, "ns": TS_NS}
_ELEM_SIZE = {CK_ARR_INT2: 6, CK_ARR_INT4: 8, CK_ARR_INT8: 12, CK_ARR_NUMERIC: NUMERIC_MAX_SIZE}
_SCALAR_SIZE = {CK_INT2: 6, CK_INT4: 8, CK_INT8: 12, CK_TIMESTAMPTZ: 12, CK_NUMERIC: NUMERIC_MAX_SIZE}


cdef class CopyEncoder:
    """Encode rows of a numpy structured array as a PostgreSQL binary COPY payload.

    Parameters
    ----------
    dtype : numpy.dtype
        The structured dtype of the rows to encode.
    columns : sequence of tuple
        One spec per output column, ``(name, type)`` or ``(name, type,
        options)``, in the order of the ``COPY`` statement's column list.
        Types: ``int2``, ``int4``, ``int8``, ``timestamptz_s`` / ``_ms`` /
        ``_us`` / ``_ns``, ``numeric``, ``int2[]``, ``int4[]``, ``int8[]``,
        ``numeric[]``, ``text_lookup``, ``text``; options: ``field``,
        ``null_if_zero``, ``null_unless_flag``, ``null_if_flag``,
        ``divisor_field`` / ``divisor`` / ``scale`` (numeric), ``table`` /
        ``default`` (text_lookup), ``value`` (text).  See
        :mod:`ingestor.pipeline.copyspec` for their meaning.

    Notes
    -----
    Two ways to use it:

    * ``encode(array, start, stop)`` returns one complete payload (signature,
      header, rows, trailer) as ``bytes``, for ``copy.write(payload)``.
    * Streaming, for batches too big for one payload in memory: ``begin()``,
      then ``encode_rows(array, start, stop)`` any number of times, then
      ``end()``.  The bytes accumulate in a buffer the encoder owns and
      reuses: send them with ``copy.write(memoryview(encoder))`` or
      ``copy.write(encoder.take())`` whenever ``nbytes`` is large enough, then
      ``clear()`` (``take()`` clears).  While a memoryview of the encoder is
      alive the buffer cannot change (``BufferError``), as with ``bytearray``.

    A row that cannot be encoded (an integer out of its column's range, a
    timestamp out of PostgreSQL's range, a divisor that is not a power of ten,
    a text lookup miss) raises :class:`ingestor.pipeline.copyspec.CopyEncodeError`
    naming the column, the row and the value; the stream buffer then ends
    with the last complete row before it, so the caller may skip the row
    and go on with ``encode_rows(array, err.row + 1, stop)``.

    No Python object is created per row, and batches of 256 rows or more are
    encoded without the GIL.  An encoder's stream is not for several threads
    at once (a concurrent call raises ``RuntimeError``); ``encode`` is.
    """

    def __cinit__(self):
        self._cols = NULL
        self._buf = NULL
        self._scratch = NULL

    def __init__(self, dtype, columns):
        import numpy as np

        if self._cols != NULL:
            raise RuntimeError("CopyEncoder is already initialised")
        self.dtype = np.dtype(dtype)
        self.plans = tuple(parse_columns(self.dtype, columns))
        self.columns = tuple(p.name for p in self.plans)
        self._keep = []
        self._setup()

    def __dealloc__(self):
        cdef Py_ssize_t j
        if self._cols != NULL:
            for j in range(self._ncols):
                free(self._cols[j].lookup)
            free(self._cols)
        free(self._buf)
        free(self._scratch)

    cdef int _setup(self) except -1:
        cdef copy_col_t *c
        cdef Py_ssize_t j, k, n
        cdef bytes b
        cdef int64_t lo
        self._ncols = len(self.plans)
        self._cols = <copy_col_t *>malloc(self._ncols * sizeof(copy_col_t))
        if self._cols == NULL:
            raise MemoryError()
        memset(self._cols, 0, self._ncols * sizeof(copy_col_t))
        max_row = 2
        for j, plan in enumerate(self.plans):
            c = &self._cols[j]
            c.kind = _KINDS[plan.type]
            c.text.length = -1
            c.scale = -1 if plan.divisor is not None else (plan.scale or 0)
            if plan.source is not None:
                _src(&c.src, plan.source)
                c.count = plan.source.count
            if plan.divisor is not None:
                _src(&c.div, plan.divisor)
            if plan.ts_unit is not None:
                c.ts_unit = _TS_UNITS[plan.ts_unit]
            c.null_if_zero = plan.null_if_zero
            if plan.null_unless_flag is not None:
                c.has_unless = True
                _src(&c.unless_src, plan.null_unless_flag[0])
                c.unless_mask = plan.null_unless_flag[1]
            if plan.null_if_flag is not None:
                c.has_if = True
                _src(&c.if_src, plan.null_if_flag[0])
                c.if_mask = plan.null_if_flag[1]
            if c.kind >= CK_ARR_INT2:
                c.elem_oid = OIDS[plan.base]
                size = 4 + ARRAY_HEADER_SIZE + c.count * _ELEM_SIZE[c.kind]
            elif c.kind == CK_TEXT:
                b = plan.text
                self._keep.append(b)
                c.text.data = b
                c.text.length = len(b)
                size = 4 + len(b)
            elif c.kind == CK_TEXT_LOOKUP:
                lo = min(plan.table)
                n = max(plan.table) - lo + 1
                c.lookup = <copy_text_t *>malloc(n * sizeof(copy_text_t))
                if c.lookup == NULL:
                    raise MemoryError()
                c.lookup_min = lo
                c.lookup_n = n
                for k in range(n):
                    c.lookup[k].data = NULL
                    c.lookup[k].length = -1
                longest = 0
                for key, b in plan.table.items():
                    self._keep.append(b)
                    c.lookup[key - lo].data = b
                    c.lookup[key - lo].length = len(b)
                    longest = max(longest, len(b))
                if plan.default is not None:
                    b = plan.default
                    self._keep.append(b)
                    c.text.data = b
                    c.text.length = len(b)
                    longest = max(longest, len(b))
                size = 4 + longest
            else:
                size = _SCALAR_SIZE[c.kind]
            c.max_size = size
            max_row += size
        if max_row > 0x7FFFFFFF:
            raise ValueError(f"a row could take {max_row} bytes: too wide")
        self.max_row_size = max_row
        return 0

    # -- helpers ------------------------------------------------------------

    def _rows_of(self, array, start, stop):
        """Validate ``array`` and the row range; return (array, start, stop)."""
        import numpy as np

        if not isinstance(array, np.ndarray):
            raise TypeError(f"expected a numpy array, got {type(array).__name__}")
        if array.dtype != self.dtype:
            raise TypeError(f"array dtype {array.dtype} is not the encoder's dtype {self.dtype}")
        if array.ndim != 1:
            raise ValueError(f"expected a 1-d array of rows, got {array.ndim} dimensions")
        n = array.shape[0]
        if stop is None:
            stop = n
        if not (0 <= start <= stop <= n):
            raise IndexError(f"rows {start}:{stop} outside an array of {n} rows")
        return array, start, stop

    cdef int _raise(self, copy_err_t *err) except -1:
        plan = self.plans[err.col]
        value = -<object>err.mag if err.neg else <object>err.mag
        where = f"column {plan.name!r} ({plan.type}), row {err.row}"
        if err.elem >= 0:
            where += f", element {err.elem}"
        if err.code == CE_INT_RANGE:
            msg = f"{where}: value {value} out of range for {plan.base}"
        elif err.code == CE_TS_RANGE:
            msg = (f"{where}: {value} {plan.ts_unit} since the Unix epoch is outside "
                   f"PostgreSQL's timestamp range")
        elif err.code == CE_DIVISOR:
            msg = (f"{where}: divisor {value} (field {plan.divisor.name!r}) is not a power "
                   f"of ten up to 10**19")
        else:
            msg = f"{where}: no text for key {value} and no default"
        raise CopyEncodeError(msg, column=plan.name, row=err.row, value=value)

    # -- one payload ----------------------------------------------------------

    def encode(self, array, Py_ssize_t start=0, stop=None):
        """Encode rows ``start:stop`` of ``array`` as one complete COPY payload.

        Parameters
        ----------
        array : numpy.ndarray
            1-d, of the encoder's dtype (any stride).
        start, stop : int
            The rows to encode (default: all).

        Returns
        -------
        bytes
            Signature, header, the rows, trailer: ready for ``copy.write``.

        Raises
        ------
        CopyEncodeError
            A value its column refuses (nothing is returned).
        """
        cdef PyObject *raw = NULL
        cdef unsigned char *b
        cdef Py_ssize_t n, bound, total
        cdef cnp.ndarray arr
        cdef Py_ssize_t last
        array, start, last = self._rows_of(array, start, stop)
        arr = array
        n = last - start
        if n > (PY_SSIZE_T_MAX - COPY_HEADER_SIZE - COPY_TRAILER_SIZE) // self.max_row_size:
            raise MemoryError(f"{n} rows are too many for one payload")
        bound = COPY_HEADER_SIZE + COPY_TRAILER_SIZE + n * self.max_row_size
        if bound <= SCRATCH_MAX and not self._scratch_busy:
            # Into the reused scratch buffer, then one copy of the exact size:
            # fresh memory for the worst case would be page-faulted in anew on
            # every call, which costs more than the copy.
            self._scratch_busy = True
            try:
                if bound > self._scratch_cap:
                    b = <unsigned char *>realloc(self._scratch, bound)
                    if b == NULL:
                        raise MemoryError()
                    self._scratch = b
                    self._scratch_cap = bound
                total = self._encode_payload(arr, start, last, self._scratch)
                return (<char *>self._scratch)[:total]
            finally:
                self._scratch_busy = False
        # A batch too big to keep a scratch buffer for (or another thread has
        # it): straight into a bytes object of the worst-case size, shrunk once.
        raw = PyBytes_FromStringAndSize_raw(NULL, bound)
        try:
            total = self._encode_payload(arr, start, last,
                                         <unsigned char *>PyBytes_AS_STRING(<object>raw))
            _PyBytes_Resize(&raw, total)
            result = <object>raw
        finally:
            Py_XDECREF(raw)
        return result

    cdef Py_ssize_t _encode_payload(self, object array, Py_ssize_t start, Py_ssize_t stop,
                                    unsigned char *out) except -1:
        """Header, rows ``start:stop``, trailer into ``out`` (room for the worst
        case); returns the payload's size."""
        cdef copy_err_t err
        cdef Py_ssize_t written
        cdef cnp.ndarray arr = array
        cdef const unsigned char *base = <const unsigned char *>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t stride = cnp.PyArray_STRIDES(arr)[0]
        cdef unsigned char *p = _put_header(out)
        if stop - start >= NOGIL_ROWS:
            with nogil:
                written = _encode_rows(self._cols, self._ncols, self.max_row_size,
                                       base, stride, start, stop, p, &err)
        else:
            written = _encode_rows(self._cols, self._ncols, self.max_row_size,
                                   base, stride, start, stop, p, &err)
        if err.code != CE_OK:
            self._raise(&err)
        p += written
        ing_store_i16be(p, -1)
        return p + COPY_TRAILER_SIZE - out

    # -- streaming ------------------------------------------------------------

    cdef int _mutable(self) except -1:
        if self._busy:
            raise RuntimeError("CopyEncoder: another thread is encoding into this stream")
        if self._exports:
            raise BufferError("CopyEncoder: the buffer is exported (release the memoryview first)")
        return 0

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need, cap
        cdef unsigned char *b
        if extra > PY_SSIZE_T_MAX - self._len:
            raise MemoryError()
        need = self._len + extra
        if need <= self._cap:
            return 0
        cap = max(need, self._cap * 2 if self._cap < PY_SSIZE_T_MAX // 2 else need, 4096)
        b = <unsigned char *>realloc(self._buf, cap)
        if b == NULL:
            raise MemoryError()
        self._buf = b
        self._cap = cap
        return 0

    def begin(self):
        """Start a stream: empty the buffer and write the signature and header."""
        self._mutable()
        self._len = 0
        self.rows = 0
        self._reserve(COPY_HEADER_SIZE)
        _put_header(self._buf)
        self._len = COPY_HEADER_SIZE
        self._state = 1

    def encode_rows(self, array, Py_ssize_t start=0, stop=None):
        """Append rows ``start:stop`` of ``array`` to the stream.

        Returns
        -------
        int
            The rows appended (``stop - start``).

        Raises
        ------
        CopyEncodeError
            For a refused row: the rows before it stay appended, nothing of
            it does; ``err.row`` says where to resume.
        """
        cdef copy_err_t err
        cdef Py_ssize_t r, block, n, written
        cdef const unsigned char *base
        cdef Py_ssize_t stride
        cdef cnp.ndarray arr
        cdef unsigned char *out
        self._mutable()
        if self._state != 1:
            raise RuntimeError("CopyEncoder: call begin() before encode_rows()"
                               if self._state == 0 else "CopyEncoder: the stream has ended")
        cdef Py_ssize_t last
        array, start, last = self._rows_of(array, start, stop)
        arr = array
        base = <const unsigned char *>cnp.PyArray_DATA(arr)
        stride = cnp.PyArray_STRIDES(arr)[0]
        r = start
        while r < last:
            block = min(last - r, <Py_ssize_t>STREAM_BLOCK_ROWS)
            self._reserve(block * self.max_row_size)
            out = self._buf + self._len
            if block >= NOGIL_ROWS:
                self._busy = True
                with nogil:
                    written = _encode_rows(self._cols, self._ncols, self.max_row_size,
                                           base, stride, r, r + block, out, &err)
                self._busy = False
            else:
                written = _encode_rows(self._cols, self._ncols, self.max_row_size,
                                       base, stride, r, r + block, out, &err)
            self._len += written
            if err.code != CE_OK:
                self.rows += err.row - r
                self._raise(&err)
            self.rows += block
            r += block
        return last - start

    def end(self):
        """Finish the stream: append the trailer."""
        self._mutable()
        if self._state != 1:
            raise RuntimeError("CopyEncoder: end() without begin()")
        self._reserve(COPY_TRAILER_SIZE)
        ing_store_i16be(self._buf + self._len, -1)
        self._len += COPY_TRAILER_SIZE
        self._state = 2

    def clear(self, release=False):
        """Drop the buffered bytes (sent already), keeping the stream's state.

        ``release=True`` also frees the memory of the stream buffer and of
        ``encode``'s scratch buffer.
        """
        self._mutable()
        self._len = 0
        if release:
            free(self._buf)
            self._buf = NULL
            self._cap = 0
            if not self._scratch_busy:
                free(self._scratch)
                self._scratch = NULL
                self._scratch_cap = 0

    def take(self):
        """The buffered bytes as ``bytes``; the buffer is then cleared."""
        self._mutable()
        data = (<char *>(self._buf if self._buf != NULL else _EMPTY))[:self._len]
        self._len = 0
        return data

    @property
    def nbytes(self):
        """Bytes in the stream buffer."""
        return self._len

    @property
    def capacity(self):
        """Bytes allocated for the stream buffer."""
        return self._cap

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self._buf if self._buf != NULL else _EMPTY,
                          self._len, 1, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self._exports -= 1

    def copy_sql(self, table):
        """The ``COPY table (columns) FROM STDIN (FORMAT BINARY)`` statement."""
        return copy_statement(table, self.plans)

    def __repr__(self):
        return f"<CopyEncoder {len(self.columns)} columns, max {self.max_row_size} bytes/row>"
