# Angel One SmartAPI WebSocket 2.0 ("SmartStream") binary frame decoding (included by
# _core.pyx, after core/frames.pyx whose buffers and helpers it shares).
#
# Layouts: the SmartAPI docs, "WebSocket Streaming 2.0", and the official clients
# (smartapi-python ``SmartWebSocketV2._parse_binary_data``, smartapi-java ``ByteUtils``).
# A binary WebSocket message is ONE packet for one token, little-endian, its mode in byte 0:
#
#   off  size  field                               LTP 1  QUOTE 2  SNAP_QUOTE 3
#     0     1  subscription mode                     *      *        *
#     1     1  exchange type (1 nse_cm, 2 nse_fo, 3 bse_cm, 4 bse_fo, 5 mcx_fo, 7 ncx_fo,
#              13 cde_fo)
#     2    25  token: ASCII, NUL-terminated and NUL-padded
#    27     8  sequence number (not for indices)     *      *        *
#    35     8  exchange timestamp, epoch ms          *      *        *    (exchange_time, to the ms)
#    43     8  last traded price, paise             *      *        *    (LTP ends: 51)
#    51     8  last traded quantity                         *        *
#    59     8  average traded price                         *        *
#    67     8  volume traded today                          *        *
#    75     8  total buy quantity (float64)                 *        *
#    83     8  total sell quantity (float64)                *        *
#    91    32  open, high, low, close                       *        *    (QUOTE ends: 123)
#   123     8  last traded timestamp (unit undocumented: read as epoch seconds)  *
#   131     8  open interest                                         *
#   139     8  OI change % (float64, "dummy field, garbage": ignored) *
#   147   200  best five: 5 buys then 5 sells, 20 bytes each: flag i16 (1 buy, 0 sell),
#              quantity i64, price i64, orders u16 (split by position, as smartapi-java)
#   347    32  upper/lower circuit, 52-week high/low (not stored)     (SNAP_QUOTE ends: 379)
#
# DEPTH (mode 4, 443 bytes, from the clients only): mode, exchange type, token as above,
# two int64 words at 27 and 35 (the clients disagree on which is the exchange timestamp:
# both are kept raw), then 20 buy levels at 43 and 20 sell levels at 243, 10 bytes each:
# quantity i32, price i32, orders u16.
#
# Every integer is signed (int64 in both clients).  A packet becomes a ``tick_t`` (and a
# ``depth_t`` for SNAP_QUOTE's book) exactly as a Kite packet does; the fields the engine and
# the tables store must fit their uint32 columns or the packet is set aside
# (``out_of_range``); informational fields that do not fit (the float total quantities, the
# timestamps) are stored as 0 -- none -- and counted (``bad_field``).  DEPTH packets carry no
# price, so no tick row: their books go to ``depth20``.
#
# Untrusted input: the mode byte selects the length every later read relies on, and the
# message's length is checked against it before anything else is read.

from libc.stdlib cimport calloc
from libc.string cimport memcmp
from libc.math cimport isfinite


cdef enum:
    SS_MODE_LTP = 1
    SS_MODE_QUOTE = 2
    SS_MODE_SNAP_QUOTE = 3
    SS_MODE_DEPTH = 4
    SS_LEN_LTP = 51
    SS_LEN_QUOTE = 123
    SS_LEN_SNAP_QUOTE = 379
    SS_LEN_DEPTH = 443
    SS_TOKEN_BYTES = 25
    SS_KEY_BYTES = 28
    SS_TABLE_MIN = 1024
    # _ss_feed_c: a token the key table lacks (``_miss`` holds it): resolve, feed again
    FEED_UNKNOWN = 3

#: SmartStream mode -> packet length.
SS_LENGTHS = {SS_MODE_LTP: SS_LEN_LTP, SS_MODE_QUOTE: SS_LEN_QUOTE,
              SS_MODE_SNAP_QUOTE: SS_LEN_SNAP_QUOTE, SS_MODE_DEPTH: SS_LEN_DEPTH}
#: SmartStream exchange type -> its segment code in the Kite table (``EXCHANGES``, price
#: divisor): the low byte of the engine key.  ncx_fo has no Kite segment: 14 is ours.
SS_SEGMENTS = {1: 1, 2: 2, 3: 4, 4: 5, 5: 7, 7: 14, 13: 3}

#: Names of ``SmartStreamDecoder.stats()``, in counter order.
SS_COUNTER_NAMES = (
    "messages", "text_messages", "bytes", "packets",
    "ltp", "quote", "snap_quote", "depth",
    "malformed_messages", "empty_message", "unknown_mode", "short", "trailing_bytes",
    "unknown_exchange", "bad_token", "out_of_range", "refused_token", "bad_field",
    "bad_records", "bad_time",
)
assert len(SS_COUNTER_NAMES) == SS_NCOUNTERS

cdef depth20_t _D20

#: A DEPTH (mode 4) packet's 20+20 level book (``SmartStreamDecoder.depth20``).
DEPTH20_DTYPE = _dtype([
    ("recv_ns", "<i8", _off(&_D20.recv_ns, &_D20)),
    ("seq", "<i8", _off(&_D20.seq, &_D20)),
    ("word27", "<i8", _off(&_D20.word27, &_D20)),
    ("word35", "<i8", _off(&_D20.word35, &_D20)),
    ("instrument_token", "<u4", _off(&_D20.instrument_token, &_D20)),
    ("divisor", "<u4", _off(&_D20.divisor, &_D20)),
    ("bid_quantity", ("<u4", (20,)), _off(&_D20.bid_quantity, &_D20)),
    ("bid_price", ("<u4", (20,)), _off(&_D20.bid_price, &_D20)),
    ("ask_quantity", ("<u4", (20,)), _off(&_D20.ask_quantity, &_D20)),
    ("ask_price", ("<u4", (20,)), _off(&_D20.ask_price, &_D20)),
    ("bid_orders", ("<u2", (20,)), _off(&_D20.bid_orders, &_D20)),
    ("ask_orders", ("<u2", (20,)), _off(&_D20.ask_orders, &_D20)),
    ("segment", "u1", _off(&_D20.segment, &_D20)),
    ("exchange_type", "u1", _off(&_D20.exchange_type, &_D20)),
], sizeof(depth20_t))


cdef inline Py_ssize_t _ss_length(uint8_t mode) noexcept nogil:
    if mode == SS_MODE_LTP:
        return SS_LEN_LTP
    if mode == SS_MODE_QUOTE:
        return SS_LEN_QUOTE
    if mode == SS_MODE_SNAP_QUOTE:
        return SS_LEN_SNAP_QUOTE
    if mode == SS_MODE_DEPTH:
        return SS_LEN_DEPTH
    return 0


cdef inline uint8_t _ss_segment(uint8_t etype) noexcept nogil:
    # SS_SEGMENTS; 0: not an exchange type of the documentation
    if etype == 1:
        return 1        # nse_cm -> NSE (indices too: Angel sends them as nse_cm tokens)
    if etype == 2:
        return 2        # nse_fo -> NFO
    if etype == 3:
        return 4        # bse_cm -> BSE
    if etype == 4:
        return 5        # bse_fo -> BFO
    if etype == 5:
        return 7        # mcx_fo -> MCX
    if etype == 7:
        return 14       # ncx_fo -> NCX
    if etype == 13:
        return 3        # cde_fo -> CDS: "for currencies, divide by 10000000.0"
    return 0


cdef inline int64_t _ss_i64(const unsigned char *p) noexcept nogil:
    return <int64_t>ing_load_u64le(p)


cdef inline double _ss_f64(const unsigned char *p) noexcept nogil:
    cdef uint64_t u = ing_load_u64le(p)
    cdef double d
    memcpy(&d, &u, 8)
    return d


cdef inline bint _ss_u32(int64_t v, uint32_t *out) noexcept nogil:
    if v < 0 or v > <int64_t>0xFFFFFFFF:
        return False
    out[0] = <uint32_t>v
    return True


cdef inline int _ss_token(const unsigned char *p, unsigned char *key,
                          uint8_t etype) noexcept nogil:
    """The table key of a packet's exchange type and token (``p``: its 25 bytes): exchange
    type, the characters up to the first NUL, zeros.  -1: empty, or a character outside
    printable ASCII (as smartapi-python, the bytes after the NUL are not the token)."""
    cdef int i = 0
    cdef unsigned char c
    memset(key, 0, SS_KEY_BYTES)
    key[0] = etype
    while i < SS_TOKEN_BYTES:
        c = p[i]
        if c == 0:
            break
        if c < 0x21 or c > 0x7e:
            return -1
        key[1 + i] = c
        i += 1
    return i if i > 0 else -1


cdef inline Py_ssize_t _ss_hash(const unsigned char *key, Py_ssize_t mask) noexcept nogil:
    # the key's 28 bytes as three 64-bit words and a 32-bit one, each multiplied by its own
    # odd constant (independent multiplies, not FNV's 28 dependent ones: those were 40% of a
    # SNAP_QUOTE packet's decoding), folded and mixed (the finaliser of splitmix64)
    cdef uint64_t w0, w1, w2, h
    cdef uint32_t w3
    memcpy(&w0, key, 8)
    memcpy(&w1, key + 8, 8)
    memcpy(&w2, key + 16, 8)
    memcpy(&w3, key + 24, 4)
    h = (w0 * 0x9E3779B97F4A7C15ULL) ^ (w1 * 0xC2B2AE3D27D4EB4FULL) \
        ^ (w2 * 0x165667B19E3779F9ULL) ^ (<uint64_t>w3 * 0xD6E8FEB86659FD93ULL)
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL
    return <Py_ssize_t>((h ^ (h >> 31)) & <uint64_t>mask)


cdef inline Py_ssize_t _ss_find(const ss_slot_t *table, Py_ssize_t mask,
                                const unsigned char *key) noexcept nogil:
    cdef Py_ssize_t h = _ss_hash(key, mask)
    while table[h].used:
        if memcmp(table[h].key, key, SS_KEY_BYTES) == 0:
            return h
        h = (h + 1) & mask
    return -1


cdef inline int _ss_reject(uint64_t *c, Py_ssize_t n, int reason) noexcept nogil:
    c[<int>SS_MESSAGES] += 1
    c[<int>SS_BYTES] += n
    c[reason] += 1
    c[<int>SS_MALFORMED] += 1
    return FEED_TAKEN


cdef inline bint _ss_parse(const unsigned char *m, uint8_t mode, tick_t *t, levels_t *book,
                           uint64_t *bad) noexcept nogil:
    """Fill ``t`` (and ``book`` for SNAP_QUOTE) from a packet of ``mode`` whose whole length
    was checked; False when a stored field is outside 0..2^32-1 (``t`` then half written)."""
    cdef int64_t ms = _ss_i64(m + 35)
    cdef int64_t v
    cdef double f
    cdef int i
    cdef const unsigned char *q
    # the exchange timestamp (ms) is exchange_time, to the millisecond: its seconds and
    # its milliseconds (tick_t's exchange_timestamp holds seconds, as Kite's)
    if ms > 0 and ms // 1000 <= <int64_t>0xFFFFFFFF:
        t.exchange_timestamp = <uint32_t>(ms // 1000)
        t.exchange_ms = <uint16_t>(ms % 1000)
    elif ms != 0:
        bad[0] += 1
    if not _ss_u32(_ss_i64(m + 43), &t.last_price):
        return False
    if mode == SS_MODE_LTP:
        return True
    if not (_ss_u32(_ss_i64(m + 51), &t.last_traded_quantity)
            and _ss_u32(_ss_i64(m + 59), &t.average_traded_price)
            and _ss_u32(_ss_i64(m + 67), &t.volume_traded)
            and _ss_u32(_ss_i64(m + 91), &t.open)
            and _ss_u32(_ss_i64(m + 99), &t.high)
            and _ss_u32(_ss_i64(m + 107), &t.low)
            and _ss_u32(_ss_i64(m + 115), &t.close)):
        return False
    f = _ss_f64(m + 75)
    if isfinite(f) and 0 <= f <= 4294967295.0:
        t.total_buy_quantity = <uint32_t>f
    else:
        bad[0] += 1
    f = _ss_f64(m + 83)
    if isfinite(f) and 0 <= f <= 4294967295.0:
        t.total_sell_quantity = <uint32_t>f
    else:
        bad[0] += 1
    if mode == SS_MODE_QUOTE:
        return True
    if not _ss_u32(_ss_i64(m + 131), &t.oi):
        return False
    v = _ss_i64(m + 123)
    if not _ss_u32(v, &t.last_trade_time):
        bad[0] += 1
    for i in range(5):
        q = m + 147 + 20 * i
        if not (_ss_u32(_ss_i64(q + 2), &book.bid_quantity[i])
                and _ss_u32(_ss_i64(q + 10), &book.bid_price[i])):
            return False
        book.bid_orders[i] = ing_load_u16le(q + 18)
        q = m + 247 + 20 * i
        if not (_ss_u32(_ss_i64(q + 2), &book.ask_quantity[i])
                and _ss_u32(_ss_i64(q + 10), &book.ask_price[i])):
            return False
        book.ask_orders[i] = ing_load_u16le(q + 18)
    return True


cdef inline bint _ss_parse20(const unsigned char *m, depth20_t *b) noexcept nogil:
    cdef int i
    cdef const unsigned char *q
    cdef uint32_t qty, price
    b.word27 = _ss_i64(m + 27)
    b.word35 = _ss_i64(m + 35)
    for i in range(20):
        q = m + 43 + 10 * i
        qty = ing_load_u32le(q)
        price = ing_load_u32le(q + 4)
        if qty > 0x7FFFFFFF or price > 0x7FFFFFFF:   # negative int32
            return False
        b.bid_quantity[i] = qty
        b.bid_price[i] = price
        b.bid_orders[i] = ing_load_u16le(q + 8)
        q = m + 243 + 10 * i
        qty = ing_load_u32le(q)
        price = ing_load_u32le(q + 4)
        if qty > 0x7FFFFFFF or price > 0x7FFFFFFF:
            return False
        b.ask_quantity[i] = qty
        b.ask_price[i] = price
        b.ask_orders[i] = ing_load_u16le(q + 8)
    return True


cdef int _ss_feed_c(SmartStreamDecoder d, const unsigned char *m, Py_ssize_t n,
                    int64_t recv_ns, int64_t seq) noexcept nogil:
    """Decode one binary message into ``d``'s buffers (no GIL needed; one thread per decoder).

    Returns ``FEED_TAKEN`` (decoded, or set aside and counted), ``FEED_NO_ROOM`` (nothing
    written or counted: drain, clear, feed again) or ``FEED_UNKNOWN`` (likewise; the token is
    not in the key table: ``d._miss`` holds its key for the caller to resolve).
    """
    cdef uint64_t *c = d._ss
    cdef uint8_t mode, etype, seg
    cdef Py_ssize_t size, h
    cdef unsigned char key[SS_KEY_BYTES]
    cdef uint32_t kv
    cdef uint64_t bad = 0
    cdef tick_t *t
    cdef levels_t *book = NULL
    cdef depth20_t *b
    if n == 0:
        return _ss_reject(c, n, SS_EMPTY)
    mode = m[0]
    size = _ss_length(mode)
    if size == 0:
        return _ss_reject(c, n, SS_UNKNOWN_MODE)
    if n < size:
        return _ss_reject(c, n, SS_SHORT)
    # from here on every read is inside the first ``size`` bytes
    etype = m[1]
    seg = _ss_segment(etype)
    if seg == 0:
        return _ss_reject(c, n, SS_UNKNOWN_EXCHANGE)
    if _ss_token(m + 2, key, etype) < 0:
        return _ss_reject(c, n, SS_BAD_TOKEN)
    h = _ss_find(d._table, d._tmask, key)
    if h < 0:
        memcpy(d._miss, key, SS_KEY_BYTES)
        return FEED_UNKNOWN
    kv = d._table[h].value
    if kv == 0:
        return _ss_reject(c, n, SS_REFUSED_TOKEN)
    if mode == SS_MODE_DEPTH:
        if d.n_depth20 == d._cap_depth20:
            return FEED_NO_ROOM     # capacity >= 1: the buffer holds rows to drain
        b = &d._depth20[d.n_depth20]
        memset(b, 0, sizeof(depth20_t))
        if not _ss_parse20(m, b):
            return _ss_reject(c, n, SS_OUT_OF_RANGE)
        b.recv_ns = recv_ns
        b.seq = seq
        b.instrument_token = kv
        b.divisor = _divisor(seg)
        b.segment = seg
        b.exchange_type = etype
        d.n_depth20 += 1
        c[<int>SS_DEPTH] += 1
    else:
        if d.n_ticks == d._cap_ticks or (mode == SS_MODE_SNAP_QUOTE
                                         and d.n_depth == d._cap_depth):
            return FEED_NO_ROOM     # capacities >= 1: the buffers hold rows to drain
        t = &d._ticks[d.n_ticks]
        memset(t, 0, sizeof(tick_t))
        if mode == SS_MODE_SNAP_QUOTE:
            # the book straight into its row (counted only once the packet is taken); every
            # level is written, so no clearing
            book = &d._depth[d.n_depth].book
        if not _ss_parse(m, mode, t, book, &bad):
            return _ss_reject(c, n, SS_OUT_OF_RANGE)
        t.recv_ns = recv_ns
        t.seq = seq
        t.instrument_token = kv
        t.segment = seg
        t.divisor = _divisor(seg)
        t.depth_row = -1
        if mode == SS_MODE_LTP:
            t.mode = MODE_LTP
            t.length = 8
            c[<int>SS_LTP] += 1
        elif mode == SS_MODE_QUOTE:
            t.mode = MODE_QUOTE
            t.length = 44
            c[<int>SS_QUOTE] += 1
        else:
            t.mode = MODE_FULL
            t.length = 184
            t.depth_row = <int32_t>d.n_depth
            d._depth[d.n_depth].tick_row = <uint32_t>d.n_ticks
            d.n_depth += 1
            c[<int>SS_SNAP_QUOTE] += 1
        d.n_ticks += 1
    c[<int>SS_MESSAGES] += 1
    c[<int>SS_BYTES] += n
    c[<int>SS_PACKETS] += 1
    c[<int>SS_BAD_FIELD] += bad
    if n > size:
        c[<int>SS_TRAILING] += 1
        c[<int>SS_MALFORMED] += 1
    return FEED_TAKEN


cdef int _ss_capture_c(SmartStreamDecoder d, const unsigned char *b, Py_ssize_t n,
                       Py_ssize_t *pos, int64_t *seq) noexcept nogil:
    """``_capture_c`` for SmartStream: walk capture records ``b[*pos:n]`` into ``d``.

    Stops at the chunk's end or a partial record (``FEED_TAKEN``), for lack of room
    (``FEED_NO_ROOM``) or at a token to resolve (``FEED_UNKNOWN``), ``*pos`` and ``*seq``
    at the record not taken.  Each record's length is checked before it is read.
    """
    cdef const unsigned char *rec
    cdef Py_ssize_t plen
    cdef int64_t recv_ns
    cdef unsigned char kind
    cdef int r
    while n - pos[0] >= CAPTURE_RECORD_HEADER:
        rec = b + pos[0]
        plen = <Py_ssize_t>ing_load_u32le(rec + 9)
        if plen > n - pos[0] - CAPTURE_RECORD_HEADER:
            break
        recv_ns = <int64_t>ing_load_u64le(rec)
        kind = rec[8]
        if kind == 1 and (recv_ns < d.min_recv_ns or recv_ns > d.max_recv_ns):
            d._ss[<int>SS_BAD_TIME] += 1
        elif kind == 1:
            r = _ss_feed_c(d, rec + CAPTURE_RECORD_HEADER, plen, recv_ns, seq[0])
            if r != FEED_TAKEN:
                return r
        elif kind == 2:
            if d.n_texts == d._cap_texts:
                return FEED_NO_ROOM
            d._texts[d.n_texts].seq = seq[0]
            d._texts[d.n_texts].recv_ns = recv_ns
            d._texts[d.n_texts].offset = pos[0] + CAPTURE_RECORD_HEADER
            d._texts[d.n_texts].length = plen
            d.n_texts += 1
            d._ss[<int>SS_TEXT_MESSAGES] += 1
        else:
            d._ss[<int>SS_BAD_RECORDS] += 1
        pos[0] += CAPTURE_RECORD_HEADER + plen
        seq[0] += 1
    return FEED_TAKEN


cdef class SmartStreamDecoder(KiteDecoder):
    """Decode SmartStream binary messages into the Kite decoder's buffers.

    The same interface and buffers as :class:`KiteDecoder` (``feed``, ``feed_capture``,
    ``ticks``, ``depth``, ``texts``, ``clear``; one thread per decoder), so the pipeline's
    engine and encoders take its output unchanged; plus ``depth20`` (``DEPTH20_DTYPE``) for
    the 20-level books of DEPTH packets, and its own ``stats()``.

    Engine keys.  A SmartStream token is a string of up to 25 bytes scoped by its exchange
    type; the engine keys instruments by a uint32.  The decoder keeps a table (exchange type,
    token) -> key and writes the key as ``instrument_token``.  A key's low byte is the
    segment code of the exchange type (``SS_SEGMENTS``: the price divisor and the exchange
    name follow from it, as for Kite tokens); the rest is assigned by ``resolver``, called
    (with the GIL, in the decoding thread) the first time a token is met:
    ``resolver(exchange_type, token) -> key | None`` (None: not an instrument; its packets
    are counted in ``refused_token``).  The daemon's resolver is the registry
    (``ingestor.store.instruments.register_angel``), so keys are the same for every
    connection and run.  Without a resolver the decoder numbers tokens itself in the order it
    meets them (``ingestor decode``, tests).  ``add_keys`` preloads the table.

    Parameters
    ----------
    capacity, depth_capacity, text_capacity : int
        As :class:`KiteDecoder`; ``depth20`` holds ``max(1, capacity // 16)`` rows.
    """

    def __cinit__(self, Py_ssize_t capacity=16384, depth_capacity=None,
                  Py_ssize_t text_capacity=256):
        self._cap_depth20 = 0
        self.n_depth20 = 0
        self._ensure20(max(1, capacity // 16))
        memset(self._ss, 0, sizeof(self._ss))
        self._table = <ss_slot_t *>calloc(SS_TABLE_MIN, sizeof(ss_slot_t))
        if self._table == NULL:
            raise MemoryError()
        self._tmask = SS_TABLE_MIN - 1
        self._tcount = 0
        self._next_local = 1
        self._tokens = {}
        self.resolver = None

    def __dealloc__(self):
        free(self._table)
        self._table = NULL

    cdef int _ensure20(self, Py_ssize_t need) except -1:
        cdef object a
        if need > self._cap_depth20:
            a = np.zeros(need, dtype=DEPTH20_DTYPE)
            if self.n_depth20:
                a[:self.n_depth20] = self.depth20[:self.n_depth20]
            self.depth20 = a
            self._depth20 = <depth20_t *>cnp.PyArray_DATA(a)
            self._cap_depth20 = need
        return 0

    cdef int _grow_table(self) except -1:
        cdef Py_ssize_t size = 2 * (self._tmask + 1)
        cdef ss_slot_t *old = self._table
        cdef Py_ssize_t oldsize = self._tmask + 1
        cdef ss_slot_t *new = <ss_slot_t *>calloc(size, sizeof(ss_slot_t))
        cdef Py_ssize_t i, h
        if new == NULL:
            raise MemoryError()
        for i in range(oldsize):
            if old[i].used:
                h = _ss_hash(old[i].key, size - 1)
                while new[h].used:
                    h = (h + 1) & (size - 1)
                new[h] = old[i]
        self._table = new
        self._tmask = size - 1
        free(old)
        return 0

    cdef int _insert(self, const unsigned char *key, uint32_t value) except -1:
        cdef Py_ssize_t h
        if 2 * (self._tcount + 1) > self._tmask + 1:
            self._grow_table()
        h = _ss_hash(key, self._tmask)
        while self._table[h].used:
            if memcmp(self._table[h].key, key, SS_KEY_BYTES) == 0:
                self._table[h].value = value
                return 0
            h = (h + 1) & self._tmask
        memcpy(self._table[h].key, key, SS_KEY_BYTES)
        self._table[h].value = value
        self._table[h].used = 1
        self._tcount += 1
        return 0

    def _check_key(self, int etype, key):
        seg = _ss_segment(<uint8_t>etype) if 0 <= etype <= 255 else 0
        if seg == 0:
            raise ValueError(f"exchange type {etype} is not a SmartStream exchange type")
        if key is None:
            return 0
        key = int(key)
        if not 0 < key < (1 << 32) or key & 0xFF != seg:
            raise ValueError(f"engine key {key} of exchange type {etype}: want 1..2^32-1 with "
                             f"the segment code {seg} in its low byte")
        return key

    cdef int _resolve_miss(self) except -1:
        cdef int etype = self._miss[0]
        cdef uint32_t seg = _ss_segment(<uint8_t>etype)
        token = (<const char *>self._miss)[1:1 + SS_TOKEN_BYTES].rstrip(b"\0").decode("ascii")
        if self.resolver is not None:
            key = self._check_key(etype, self.resolver(etype, token))
        else:
            while True:
                if self._next_local >= (1 << 24):
                    raise OverflowError("more than 2^24 tokens in one decoder")
                key = (self._next_local << 8) | seg
                self._next_local += 1
                if key not in self._tokens:
                    break
        self._insert(self._miss, <uint32_t>key)
        if key:
            self._tokens[key] = (etype, token)
        return 0

    def add_keys(self, keys):
        """Preload the key table: ``keys`` is an iterable of ``(exchange_type, token, key)``
        (``key`` None: refused)."""
        cdef unsigned char k[SS_KEY_BYTES]
        for etype, token, key in keys:
            key = self._check_key(int(etype), key)
            raw = token.encode("ascii") if isinstance(token, str) else bytes(token)
            padded = raw + bytes(max(0, SS_TOKEN_BYTES - len(raw)))
            if len(raw) > SS_TOKEN_BYTES or _ss_token(<const unsigned char *><const char *>padded,
                                                      k, <uint8_t>int(etype)) != len(raw):
                raise ValueError(f"token {raw[:40]!r}: want 1..25 printable ASCII characters")
            self._insert(k, <uint32_t>key)
            if key:
                self._tokens[key] = (int(etype), raw.decode("ascii"))

    def token_of(self, key):
        """``(exchange_type, token)`` of an engine key the table holds, else None."""
        return self._tokens.get(int(key))

    def keys(self):
        """``{engine key: (exchange_type, token)}`` of every token met or preloaded."""
        return dict(self._tokens)

    def feed(self, message, int64_t recv_ns=0, int64_t seq=0):
        """Append the packet of one binary WebSocket message (see ``KiteDecoder.feed``).

        Returns True when the message was taken (decoded, or set aside and counted), False
        when the buffers lack room: drain them, ``clear()``, feed again.
        """
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(message, &view, PyBUF_SIMPLE)
        try:
            while True:
                # one packet of at most 443 bytes read: shorter than a GIL hand-over
                r = _ss_feed_c(self, <const unsigned char *>view.buf, view.len, recv_ns, seq)
                if r != FEED_UNKNOWN:
                    break
                self._resolve_miss()
        finally:
            PyBuffer_Release(&view)
        return r == FEED_TAKEN

    def feed_capture(self, chunk, Py_ssize_t pos=0, int64_t seq=0):
        """Decode capture records from ``chunk[pos:]`` (see ``KiteDecoder.feed_capture``).

        Returns ``(pos, seq, full)``: where the next record starts, its sequence number, and
        whether decoding stopped for lack of room.
        """
        cdef Py_buffer view
        cdef const unsigned char *b
        cdef Py_ssize_t n
        cdef int r
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            b = <const unsigned char *>view.buf
            n = view.len
            if pos < 0 or pos > n:
                raise ValueError(f"pos {pos} outside a chunk of {n} bytes")
            while True:
                with nogil:
                    r = _ss_capture_c(self, b, n, &pos, &seq)
                if r != FEED_UNKNOWN:
                    break
                self._resolve_miss()
        finally:
            PyBuffer_Release(&view)
        return pos, seq, r == FEED_NO_ROOM

    def clear(self):
        """Forget the buffered rows (the buffers and the key table are kept)."""
        self.n_ticks = 0
        self.n_depth = 0
        self.n_texts = 0
        self.n_depth20 = 0

    def stats(self):
        """Counters since creation (or ``reset_stats``), by name (``SS_COUNTER_NAMES``)."""
        return {name: int(self._ss[i]) for i, name in enumerate(SS_COUNTER_NAMES)}

    def reset_stats(self):
        memset(self._ss, 0, sizeof(self._ss))

    @property
    def depth20_capacity(self):
        return self._cap_depth20
