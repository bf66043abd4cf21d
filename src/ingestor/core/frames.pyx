# Kite Connect binary frame decoding (included by _core.pyx).
#
# Layouts: Kite Connect v3 WebSocket docs, "Message structure" and "Quote
# packet structure", and the official Python client (kiteconnect 5.2.2,
# KiteTicker._parse_binary / _split_packets).  A binary message is
#   uint16 N, then N times (uint16 length, packet[length]), big-endian,
# and a packet's mode is given by its length alone: 8 LTP, 28 index quote,
# 32 index full, 44 quote, 184 full.  Every field is an unsigned 32-bit
# big-endian integer except the depth order counts (uint16 + 2 pad bytes).
#
# Untrusted input: every read is preceded by a check that it stays inside
# the message.  The walk over a message runs twice, first to count (so a
# message is taken whole or not at all), then to decode.


cdef struct scan_t:
    Py_ssize_t packets      # packets of a known length, before any damage
    Py_ssize_t full         # of which full (184-byte) packets
    Py_ssize_t unknown      # packets skipped for an unknown length
    bint truncated          # the count or a length ran past the end
    bint trailing           # bytes left after the last packet


cdef inline uint32_t _divisor(uint32_t segment) noexcept nogil:
    # KiteTicker._parse_binary: cds 1e7; bcd and nco 1e4; everything else 100.
    if segment == 3:
        return 10000000
    if segment == 6 or segment == 12:
        return 10000
    return 100


cdef inline bint _known_length(Py_ssize_t n) noexcept nogil:
    return n == 8 or n == 28 or n == 32 or n == 44 or n == 184


cdef inline void _parse_packet(const unsigned char *p, Py_ssize_t plen,
                               tick_t *t, levels_t *book) noexcept nogil:
    # ``plen`` is a known length and ``p[0:plen]`` lies inside the message
    # (checked by the caller).  ``book`` is written for 184-byte packets only.
    cdef int64_t recv_ns = t.recv_ns
    cdef int64_t seq = t.seq
    cdef uint32_t token = ing_load_u32be(p)
    cdef int i
    cdef const unsigned char *q
    memset(t, 0, sizeof(tick_t))
    t.recv_ns = recv_ns
    t.seq = seq
    t.instrument_token = token
    t.segment = token & 0xff
    t.divisor = _divisor(token & 0xff)
    t.length = <uint16_t>plen
    t.depth_row = -1
    t.last_price = ing_load_u32be(p + 4)
    if plen == 8:
        t.mode = MODE_LTP
    elif plen == 28 or plen == 32:
        # Index packet: the order here is high, low, open, close.
        t.high = ing_load_u32be(p + 8)
        t.low = ing_load_u32be(p + 12)
        t.open = ing_load_u32be(p + 16)
        t.close = ing_load_u32be(p + 20)
        t.net_change = <int32_t>ing_load_u32be(p + 24)
        if plen == 32:
            t.mode = MODE_FULL
            t.exchange_timestamp = ing_load_u32be(p + 28)
        else:
            t.mode = MODE_QUOTE
    else:
        t.last_traded_quantity = ing_load_u32be(p + 8)
        t.average_traded_price = ing_load_u32be(p + 12)
        t.volume_traded = ing_load_u32be(p + 16)
        t.total_buy_quantity = ing_load_u32be(p + 20)
        t.total_sell_quantity = ing_load_u32be(p + 24)
        t.open = ing_load_u32be(p + 28)
        t.high = ing_load_u32be(p + 32)
        t.low = ing_load_u32be(p + 36)
        t.close = ing_load_u32be(p + 40)
        if plen == 184:
            t.mode = MODE_FULL
            t.last_trade_time = ing_load_u32be(p + 44)
            t.oi = ing_load_u32be(p + 48)
            t.oi_day_high = ing_load_u32be(p + 52)
            t.oi_day_low = ing_load_u32be(p + 56)
            t.exchange_timestamp = ing_load_u32be(p + 60)
            # 10 entries of (quantity u32, price u32, orders u16, pad u16):
            # five bids from byte 64, five offers from byte 124.
            for i in range(5):
                q = p + 64 + 12 * i
                book.bid_quantity[i] = ing_load_u32be(q)
                book.bid_price[i] = ing_load_u32be(q + 4)
                book.bid_orders[i] = ing_load_u16be(q + 8)
                q = p + 124 + 12 * i
                book.ask_quantity[i] = ing_load_u32be(q)
                book.ask_price[i] = ing_load_u32be(q + 4)
                book.ask_orders[i] = ing_load_u16be(q + 8)
        else:
            t.mode = MODE_QUOTE


cdef inline double _change(const tick_t *t) noexcept nogil:
    # KiteTicker: change = (last_price - close) * 100 / close with both
    # already divided (float), 0 when close is 0 or the mode has no close.
    # The same IEEE double operations in the same order give the same bits.
    cdef double div = <double>t.divisor
    cdef double close = <double>t.close / div
    cdef double last = <double>t.last_price / div
    if t.mode == MODE_LTP or close == 0:
        return 0.0
    return (last - close) * 100.0 / close


cdef void _scan(const unsigned char *m, Py_ssize_t n, scan_t *s) noexcept nogil:
    """Walk the framing of a message of ``n >= 2`` bytes without decoding."""
    cdef Py_ssize_t count = ing_load_u16be(m)
    cdef Py_ssize_t i, plen
    cdef Py_ssize_t j = 2
    memset(s, 0, sizeof(scan_t))
    for i in range(count):
        if j + 2 > n:
            s.truncated = True
            return
        plen = ing_load_u16be(m + j)
        if j + 2 + plen > n:
            s.truncated = True
            return
        if _known_length(plen):
            s.packets += 1
            if plen == 184:
                s.full += 1
        else:
            s.unknown += 1
        j += 2 + plen
    s.trailing = j < n


cdef inline Py_ssize_t _walk(const unsigned char *m, Py_ssize_t n, Py_ssize_t limit,
                             tick_t *tick, Py_ssize_t tick_stride,
                             levels_t *book, Py_ssize_t book_stride,
                             bint book_per_tick) noexcept nogil:
    """Decode the first ``limit`` known-length packets (as counted by _scan).

    Tick ``k`` goes to ``tick + k * tick_stride`` bytes.  Books go to
    ``book`` advancing by ``book_stride`` per full packet, or per packet
    (zeroed for packets without one) when ``book_per_tick``.  Returns the
    number of books written.
    """
    cdef Py_ssize_t j = 2
    cdef Py_ssize_t k = 0
    cdef Py_ssize_t nbooks = 0
    cdef Py_ssize_t plen
    cdef char *tp = <char *>tick
    cdef char *bp = <char *>book
    while k < limit:
        # _scan proved these reads in bounds for the first ``limit`` packets.
        if INGESTOR_DEBUG:
            if j + 2 > n:
                abort()
        plen = ing_load_u16be(m + j)
        if INGESTOR_DEBUG:
            if j + 2 + plen > n:
                abort()
        if _known_length(plen):
            _parse_packet(m + j + 2, plen, <tick_t *>tp, <levels_t *>bp)
            if book_per_tick:
                if plen != 184:
                    memset(bp, 0, sizeof(levels_t))
                bp += book_stride
                nbooks += 1
            elif plen == 184:
                bp += book_stride
                nbooks += 1
            tp += tick_stride
            k += 1
        j += 2 + plen
    return nbooks


cdef inline void _count_scan(uint64_t *c, const scan_t *s, Py_ssize_t n, const tick_t *t,
                             Py_ssize_t ntick) noexcept nogil:
    cdef Py_ssize_t i
    c[<int>C_MESSAGES] += 1
    c[<int>C_BYTES] += n
    c[<int>C_PACKETS] += s.packets
    for i in range(ntick):
        if t[i].length == 8:
            c[<int>C_LTP] += 1
        elif t[i].length == 44:
            c[<int>C_QUOTE] += 1
        elif t[i].length == 184:
            c[<int>C_FULL] += 1
        elif t[i].length == 28:
            c[<int>C_INDEX_QUOTE] += 1
        else:
            c[<int>C_INDEX_FULL] += 1
    c[<int>C_ERR_UNKNOWN_LENGTH] += s.unknown
    if s.truncated:
        c[<int>C_ERR_TRUNCATED] += 1
    if s.trailing:
        c[<int>C_ERR_TRAILING] += 1
    if s.truncated or s.trailing or s.unknown:
        c[<int>C_MALFORMED_MESSAGES] += 1


cdef enum:
    # _feed_c results
    FEED_NO_ROOM = 0
    FEED_TAKEN = 1
    FEED_GROW = 2       # larger than the empty buffers: grow (with the GIL), feed again
    # feed() releases the GIL for messages at least this long: below it the decode is
    # shorter than a GIL hand-over, and a thread that gives the GIL up per small message
    # waits up to the switch interval to get it back when another thread is busy
    NOGIL_MESSAGE_BYTES = 2048


cdef int _feed_c(KiteDecoder d, const unsigned char *msg, Py_ssize_t n, int64_t recv_ns,
                 int64_t seq, scan_t *s) noexcept nogil:
    """Decode one message into ``d``'s buffers; C fields and buffers only (no GIL needed).

    ``msg[:n]`` must stay valid and unchanged, and ``d``'s buffers must not be replaced,
    while this runs: the caller holds a buffer view of the message and ``d`` is used by
    one thread at a time (see :class:`KiteDecoder`).  Returns ``FEED_TAKEN``,
    ``FEED_NO_ROOM`` (nothing written, nothing counted) or ``FEED_GROW`` (likewise; ``s``
    holds the message's packet counts for the caller's ``_ensure``).
    """
    cdef Py_ssize_t i, first, nb
    cdef tick_t *t
    if n < 2:
        d._counters[<int>C_MESSAGES] += 1
        d._counters[<int>C_BYTES] += n
        if n == 1:
            d._counters[<int>C_HEARTBEATS] += 1
        else:
            d._counters[<int>C_ERR_EMPTY] += 1
            d._counters[<int>C_MALFORMED_MESSAGES] += 1
        return FEED_TAKEN
    _scan(msg, n, s)
    if (d.n_ticks + s.packets > d._cap_ticks
            or d.n_depth + s.full > d._cap_depth):
        if d.n_ticks or d.n_depth:
            return FEED_NO_ROOM
        # A single message larger than the empty buffers: the caller grows them to fit.
        return FEED_GROW
    first = d.n_ticks
    t = d._ticks + first
    for i in range(s.packets):
        t[i].recv_ns = recv_ns
        t[i].seq = seq
    nb = _walk(msg, n, s.packets, t, sizeof(tick_t),
               &d._depth[d.n_depth].book, sizeof(depth_t), False)
    # Link ticks and books both ways.
    if nb:
        for i in range(s.packets):
            if t[i].length == 184:
                t[i].depth_row = <int32_t>d.n_depth
                d._depth[d.n_depth].tick_row = <uint32_t>(first + i)
                d.n_depth += 1
    if INGESTOR_DEBUG:
        if nb != s.full:
            abort()
    d.n_ticks += s.packets
    _count_scan(d._counters, s, n, t, s.packets)
    return FEED_TAKEN


cdef int _capture_c(KiteDecoder d, const unsigned char *b, Py_ssize_t n, Py_ssize_t *pos,
                    int64_t *seq, scan_t *s) noexcept nogil:
    """Walk capture records ``b[*pos:n]`` into ``d`` (``*pos``, ``*seq`` advanced); no GIL.

    Stops at the chunk's end or a partial record (``FEED_TAKEN``), for lack of room
    (``FEED_NO_ROOM``) or at a binary record larger than the empty buffers (``FEED_GROW``:
    ``*pos`` at that record, ``s`` its counts).  The caller checked ``0 <= *pos <= n``;
    each record's length is checked against what is left before it is read.
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
            # a receive time outside the window would pin the instrument's time (times only
            # grow per instrument): the record is refused, counted, its place kept
            d._counters[<int>C_BAD_TIME] += 1
        elif kind == 1:
            r = _feed_c(d, rec + CAPTURE_RECORD_HEADER, plen, recv_ns, seq[0], s)
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
            d._counters[<int>C_TEXT_MESSAGES] += 1
        else:
            d._counters[<int>C_BAD_RECORDS] += 1
        pos[0] += CAPTURE_RECORD_HEADER + plen
        seq[0] += 1
    return FEED_TAKEN


cdef class KiteDecoder:
    """Decode Kite binary messages into preallocated, reusable numpy buffers.

    The pipeline's decoder: ``feed`` appends one message's packets,
    ``feed_capture`` walks the records of a capture chunk in C.  Ticks go to
    ``ticks`` (``TICK_DTYPE``), the books of full packets to ``depth``
    (``DEPTH_DTYPE``, linked both ways), text messages' places to ``texts``.
    ``clear()`` empties the buffers for reuse; nothing is allocated per
    message.  A message is taken whole or not at all: when the buffers lack
    room, ``feed`` returns False and the caller drains and clears them.

    Parameters
    ----------
    capacity : int
        Tick rows held before the caller must drain.
    depth_capacity : int, optional
        Book rows held (default: ``capacity // 4``).
    text_capacity : int
        Text-message places held by ``feed_capture``.

    Attributes
    ----------
    min_recv_ns, max_recv_ns : int
        The receive-time window of ``feed_capture``: a binary record received outside it is
        skipped and counted in ``bad_time`` (its sequence number still passes).  Open by
        default; the pipeline's driver sets it (``ingestor.pipeline.driver``).

    Notes
    -----
    ``feed_capture`` (always) and ``feed`` (for messages of 2 KiB or more) decode with
    the GIL released, so a pipeline thread decoding and the event loop can use two cores.
    While they run, C code writes into this decoder's buffers through raw pointers and
    reads the message or chunk through a buffer view: **one thread per decoder** -- no
    other thread may call any method of the same decoder (``feed``, ``feed_capture``,
    ``clear``...) or rebind its arrays meanwhile, or the buffers may be replaced (grown)
    or freed under the walk.  The input itself is safe: the view held during the call
    keeps a ``bytearray`` or ``mmap`` from being resized or closed (they refuse with
    ``BufferError``).  Reading ``ticks``/``depth``/``texts`` from another thread while a
    call runs would see rows half written; drain them between calls, as the pipeline does.
    """

    def __cinit__(self, Py_ssize_t capacity=16384, depth_capacity=None,
                  Py_ssize_t text_capacity=256):
        if capacity < 1 or text_capacity < 1:
            raise ValueError("capacities must be positive")
        self._cap_ticks = 0
        self._cap_depth = 0
        self._ensure(capacity, max(1, capacity // 4) if depth_capacity is None
                     else max(1, <Py_ssize_t>depth_capacity))
        self._cap_texts = text_capacity
        self.texts = np.zeros(text_capacity, dtype=TEXT_DTYPE)
        self._texts = <text_t *>cnp.PyArray_DATA(self.texts)
        memset(self._counters, 0, sizeof(self._counters))
        self.min_recv_ns = INT64_MIN
        self.max_recv_ns = INT64_MAX

    cdef int _ensure(self, Py_ssize_t need_ticks, Py_ssize_t need_depth) except -1:
        # Grow (never shrink) the buffers, keeping the rows already in them.
        cdef object a
        if need_ticks > self._cap_ticks:
            a = np.zeros(need_ticks, dtype=TICK_DTYPE)
            if self.n_ticks:
                a[:self.n_ticks] = self.ticks[:self.n_ticks]
            self.ticks = a
            self._ticks = <tick_t *>cnp.PyArray_DATA(a)
            self._cap_ticks = need_ticks
        if need_depth > self._cap_depth:
            a = np.zeros(need_depth, dtype=DEPTH_DTYPE)
            if self.n_depth:
                a[:self.n_depth] = self.depth[:self.n_depth]
            self.depth = a
            self._depth = <depth_t *>cnp.PyArray_DATA(a)
            self._cap_depth = need_depth
        return 0

    cdef int _feed(self, const unsigned char *msg, Py_ssize_t n, int64_t recv_ns,
                   int64_t seq) except -1:
        # 1: taken; 0: not enough room (nothing written, nothing counted).
        cdef scan_t s
        cdef int r
        if n >= NOGIL_MESSAGE_BYTES:
            with nogil:
                r = _feed_c(self, msg, n, recv_ns, seq, &s)
        else:
            r = _feed_c(self, msg, n, recv_ns, seq, &s)
        if r == FEED_GROW:
            self._ensure(s.packets, s.full)
            r = _feed_c(self, msg, n, recv_ns, seq, &s)
            if INGESTOR_DEBUG:
                if r != FEED_TAKEN:
                    abort()
        return r

    def feed(self, message, int64_t recv_ns=0, int64_t seq=0):
        """Append the packets of one binary WebSocket message.

        Returns True when the message was taken (including heartbeats and
        damaged messages, whose valid packets are kept and damage counted),
        False when the buffers lack room: drain them, ``clear()``, feed again.
        """
        cdef Py_buffer view
        cdef int r
        PyObject_GetBuffer(message, &view, PyBUF_SIMPLE)
        try:
            r = self._feed(<const unsigned char *>view.buf, view.len, recv_ns, seq)
        finally:
            PyBuffer_Release(&view)
        return r == 1

    def feed_capture(self, chunk, Py_ssize_t pos=0, int64_t seq=0):
        """Decode capture records from ``chunk[pos:]`` until data or room runs out.

        ``chunk`` holds whole or partial capture records (the part after the
        file header); ``seq`` is the sequence number of the record at
        ``pos``.  Binary records are decoded as by ``feed``; text records are
        noted in ``texts`` (their offsets into ``chunk``) for the caller.

        Returns
        -------
        (pos, seq, full) : tuple
            Where the next record starts, its sequence number, and whether
            decoding stopped for lack of room (else: the chunk ends, possibly
            inside a record, which the caller completes with more data).
        """
        cdef Py_buffer view
        cdef const unsigned char *b
        cdef Py_ssize_t n
        cdef scan_t s
        cdef int r
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            b = <const unsigned char *>view.buf
            n = view.len
            if pos < 0 or pos > n:
                raise ValueError(f"pos {pos} outside a chunk of {n} bytes")
            while True:
                # the view pins the chunk; one thread per decoder pins the buffers
                with nogil:
                    r = _capture_c(self, b, n, &pos, &seq, &s)
                if r != FEED_GROW:
                    break
                # a record larger than the empty buffers: grow them (with the GIL), go on
                self._ensure(s.packets, s.full)
        finally:
            PyBuffer_Release(&view)
        return pos, seq, r == FEED_NO_ROOM

    def clear(self):
        """Forget the buffered rows (the buffers are kept for reuse)."""
        self.n_ticks = 0
        self.n_depth = 0
        self.n_texts = 0

    def stats(self):
        """Counters since creation (or ``reset_stats``), by name."""
        return {name: int(self._counters[i]) for i, name in enumerate(COUNTER_NAMES)}

    def reset_stats(self):
        memset(self._counters, 0, sizeof(self._counters))

    @property
    def capacity(self):
        return self._cap_ticks

    @property
    def depth_capacity(self):
        return self._cap_depth


def decode_kite(message, int64_t recv_ns=0, int64_t seq=0):
    """Decode one Kite binary WebSocket message into a structured array.

    Parameters
    ----------
    message : bytes, bytearray or memoryview
        The message exactly as the broker sent it.
    recv_ns : int
        Receive time (ns since the Unix epoch, UTC) stored in every record.
    seq : int
        The message's sequence number in its stream, stored in every record.

    Returns
    -------
    numpy.ndarray
        One ``FULL_DTYPE`` record per packet of a known length, in order:
        every field of its mode as raw integers (prices are ``raw /
        divisor`` exactly), the client's ``change``, and the 5+5 book (zeros
        where the mode has none).  A heartbeat gives an empty array; damage
        (a length running past the end, unknown packet lengths, trailing
        bytes) keeps the valid packets before it, as ``KiteDecoder`` does.
    """
    cdef Py_buffer view
    cdef scan_t s
    cdef Py_ssize_t i
    cdef full_t *out
    cdef object arr
    PyObject_GetBuffer(message, &view, PyBUF_SIMPLE)
    try:
        if view.len < 2:
            return np.empty(0, dtype=FULL_DTYPE)
        _scan(<const unsigned char *>view.buf, view.len, &s)
        arr = np.empty(s.packets, dtype=FULL_DTYPE)
        out = <full_t *>cnp.PyArray_DATA(arr)
        for i in range(s.packets):
            out[i].tick.recv_ns = recv_ns
            out[i].tick.seq = seq
        _walk(<const unsigned char *>view.buf, view.len, s.packets, &out[0].tick,
              sizeof(full_t), &out[0].book, sizeof(full_t), True)
        for i in range(s.packets):
            out[i].change = _change(&out[i].tick)
    finally:
        PyBuffer_Release(&view)
    return arr


def capture_span(buf, Py_ssize_t max_payload, bint stop_at_bad=False):
    """Walk the capture records at the start of ``buf`` (the batch path's framing).

    Returns ``(end, count)``: the offset just past the last whole record and
    how many whole records precede it.  Raises ``ValueError`` at a record
    claiming more than ``max_payload`` bytes (not a capture record), or with
    ``stop_at_bad`` stops there (``end`` is that record's offset).
    """
    cdef Py_buffer view
    cdef const unsigned char *b
    cdef Py_ssize_t n, plen
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t count = 0
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char *>view.buf
        n = view.len
        while n - pos >= CAPTURE_RECORD_HEADER:
            plen = <Py_ssize_t>ing_load_u32le(b + pos + 9)
            if plen > max_payload:
                if stop_at_bad:
                    break
                raise ValueError(f"record at byte {pos} claims {plen} bytes: not a capture record")
            if plen > n - pos - CAPTURE_RECORD_HEADER:
                break
            pos += CAPTURE_RECORD_HEADER + plen
            count += 1
    finally:
        PyBuffer_Release(&view)
    return pos, count


# -- capture format 2: records framed for resynchronisation ----------------------------------
#
# A format-2 record (``feed/capture.py`` has the layout) is a format-1 record behind a marker,
# its own sequence number and a CRC-32 (zlib's) over everything after the marker: a damaged
# length no longer loses the rest of a file, because the reader can find the next intact
# record and knows, from its sequence number, exactly which records were lost.  The pipeline
# keeps walking format-1 records (``_capture_c``): the reader checks and unframes format-2
# records into format-1 ones here, the writer frames them, both without the GIL.

cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)

cdef enum:
    CAPTURE2_HEADER = 29     # marker 4, seq 8, recv_ns 8, kind 1, length 4, crc 4
    CAPTURE2_EXTRA = 16      # what a format-2 record adds to a format-1 one
    CAP2_OK = 0
    CAP2_PARTIAL = 1         # consistent so far, cut by the buffer's end
    CAP2_BAD = 2
    CAP2_GAP = 3             # intact, but not the sequence number expected
    CAP2_NONE = 4

#: the record marker: a byte with the high bit set first (no text starts with it), then "REC"
CAPTURE2_MARKER = b"\x89REC"
cdef const unsigned char *_MARK = <const unsigned char *>b"\x89REC"

CAPTURE2_STATUS = {CAP2_OK: "ok", CAP2_PARTIAL: "partial", CAP2_BAD: "bad", CAP2_GAP: "gap",
                   CAP2_NONE: "none"}


cdef inline void _store_u32le(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void _store_u64le(unsigned char *p, uint64_t v) noexcept nogil:
    _store_u32le(p, <uint32_t>(v & 0xFFFFFFFFu))
    _store_u32le(p + 4, <uint32_t>(v >> 32))


cdef inline uint32_t _cap2_crc(const unsigned char *rec, Py_ssize_t plen) noexcept nogil:
    # seq, recv_ns, kind and length (21 bytes after the marker), then the payload
    cdef unsigned long c = crc32(0, rec + 4, 21)
    return <uint32_t>crc32(c, rec + CAPTURE2_HEADER, <unsigned int>plen)


cdef int _cap2_check(const unsigned char *b, Py_ssize_t n, Py_ssize_t pos,
                     Py_ssize_t max_payload, Py_ssize_t *plen) noexcept nogil:
    """Is there an intact format-2 record at ``b[pos:n]``?  ``CAP2_OK`` (``*plen`` set),
    ``CAP2_PARTIAL`` (what the buffer holds is consistent, the rest is beyond it) or
    ``CAP2_BAD``.  Every read is checked against ``n`` first."""
    cdef const unsigned char *rec = b + pos
    cdef Py_ssize_t left = n - pos
    cdef Py_ssize_t i
    for i in range(4 if left > 4 else left):
        if rec[i] != _MARK[i]:
            return CAP2_BAD
    if left < CAPTURE2_HEADER:
        return CAP2_PARTIAL
    if rec[20] != 1 and rec[20] != 2:
        return CAP2_BAD
    plen[0] = <Py_ssize_t>ing_load_u32le(rec + 21)
    if plen[0] > max_payload:
        return CAP2_BAD
    if plen[0] > left - CAPTURE2_HEADER:
        return CAP2_PARTIAL
    if ing_load_u32le(rec + 25) != _cap2_crc(rec, plen[0]):
        return CAP2_BAD
    return CAP2_OK


def capture2_unframe(buf, Py_ssize_t pos, Py_ssize_t max_payload, int64_t seq, out):
    """Check format-2 records from ``buf[pos:]`` and copy them, as format-1 records, to ``out``.

    Goes on while each record is whole, intact and carries ``seq``, ``seq + 1``...

    Parameters
    ----------
    buf : buffer
    pos : int
        Where the first record starts.
    max_payload : int
        A record claiming more is damaged.
    seq : int
        The sequence number the record at ``pos`` must carry.
    out : writable buffer
        At least ``len(buf) - pos`` bytes.

    Returns
    -------
    (pos, out_len, count, status) : tuple
        Where the first record not taken starts, the bytes written to ``out``, the records
        taken, and why it stopped: ``CAP2_OK`` (the buffer ends there exactly),
        ``CAP2_PARTIAL`` (a record cut by the buffer's end), ``CAP2_BAD`` (a damaged record
        at ``pos``) or ``CAP2_GAP`` (an intact record with another sequence number).
    """
    cdef Py_buffer view, oview
    cdef const unsigned char *b
    cdef unsigned char *o
    cdef Py_ssize_t n, plen = 0, olen = 0, count = 0
    cdef int r = CAP2_OK
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &oview, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            b = <const unsigned char *>view.buf
            n = view.len
            o = <unsigned char *>oview.buf
            if pos < 0 or pos > n:
                raise ValueError(f"pos {pos} outside a buffer of {n} bytes")
            if oview.len < n - pos:
                raise ValueError(f"out holds {oview.len} bytes, {n - pos} needed")
            with nogil:
                while pos < n:
                    r = _cap2_check(b, n, pos, max_payload, &plen)
                    if r != CAP2_OK:
                        break
                    if <int64_t>ing_load_u64le(b + pos + 4) != seq:
                        r = CAP2_GAP
                        break
                    memcpy(o + olen, b + pos + 12, CAPTURE_RECORD_HEADER)
                    memcpy(o + olen + CAPTURE_RECORD_HEADER, b + pos + CAPTURE2_HEADER, plen)
                    olen += 13 + plen
                    pos += CAPTURE2_HEADER + plen
                    seq += 1
                    count += 1
                    r = CAP2_OK
        finally:
            PyBuffer_Release(&oview)
    finally:
        PyBuffer_Release(&view)
    return pos, olen, count, r


def capture2_resync(buf, Py_ssize_t pos, Py_ssize_t max_payload):
    """The first offset at or after ``pos`` where an intact record starts.

    Returns ``(offset, status)``: ``CAP2_OK`` (an intact record there), ``CAP2_PARTIAL``
    (a record may start there that the buffer cuts: read more, or at the end of the file
    go on from ``offset + 1``), or ``CAP2_NONE`` with ``offset`` the length of the buffer.
    """
    cdef Py_buffer view
    cdef const unsigned char *b
    cdef const unsigned char *p
    cdef Py_ssize_t n, plen = 0
    cdef int r = CAP2_NONE
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        b = <const unsigned char *>view.buf
        n = view.len
        if pos < 0:
            pos = 0
        with nogil:
            while pos < n:
                p = <const unsigned char *>memchr(b + pos, _MARK[0], <size_t>(n - pos))
                if p == NULL:
                    pos = n
                    break
                pos = p - b
                r = _cap2_check(b, n, pos, max_payload, &plen)
                if r != CAP2_BAD:
                    break
                r = CAP2_NONE
                pos += 1
    finally:
        PyBuffer_Release(&view)
    return pos, r


def capture2_frame(records, int64_t first_seq, out):
    """Frame whole format-1 ``records`` as format-2 ones into ``out``, the first carrying
    ``first_seq``; returns ``(bytes written, records)``.  ``out`` holds at least
    ``len(records) + 16 * records``; a record running past the end raises ``ValueError``."""
    cdef Py_buffer view, oview
    cdef const unsigned char *b
    cdef unsigned char *o
    cdef Py_ssize_t n, plen, pos = 0, olen = 0, count = 0, cap
    cdef bint bad = False
    PyObject_GetBuffer(records, &view, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &oview, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            b = <const unsigned char *>view.buf
            n = view.len
            o = <unsigned char *>oview.buf
            cap = oview.len
            with nogil:
                while pos < n:
                    if n - pos < CAPTURE_RECORD_HEADER:
                        bad = True
                        break
                    plen = <Py_ssize_t>ing_load_u32le(b + pos + 9)
                    if (plen > n - pos - CAPTURE_RECORD_HEADER
                            or cap - olen < CAPTURE2_HEADER + plen):
                        bad = True
                        break
                    memcpy(o + olen, _MARK, 4)
                    _store_u64le(o + olen + 4, <uint64_t>(first_seq + count))
                    memcpy(o + olen + 12, b + pos, CAPTURE_RECORD_HEADER)
                    memcpy(o + olen + CAPTURE2_HEADER, b + pos + CAPTURE_RECORD_HEADER, plen)
                    _store_u32le(o + olen + 25, _cap2_crc(o + olen, plen))
                    olen += CAPTURE2_HEADER + plen
                    pos += CAPTURE_RECORD_HEADER + plen
                    count += 1
        finally:
            PyBuffer_Release(&oview)
    finally:
        PyBuffer_Release(&view)
    if bad:
        raise ValueError(f"record at byte {pos} runs past the end of the records or of out")
    return olen, count
