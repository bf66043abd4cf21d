# The aggregation engine (included by _core.pyx): decoded Kite ticks to the
# rows of tick_data, ohlc_candles and order_book_snapshots, in place.
#
# Per instrument the engine keeps a slot: its last receive time (to make
# ``time`` strictly increasing), its last cumulative volume (for volume
# increases), one forming candle per timeframe (acc_t, one cache line each)
# and its latest 5-level book (a snapshot_t row of ``books``).  Memory is
# bounded by the number of instruments; the output buffers are preallocated
# and reused.  Nothing in the per-tick loop touches a Python object.
#
# Definitions (issue "In-place candles and order-book depth"; SQL equivalent
# in tests/test_candles_sql.py):
#   bucket(t)  = floor((t + utc_offset - origin) / length) * length
#                - (utc_offset - origin)
#   increase   = cum - prev_cum (cum >= prev_cum), cum (a fall: new session),
#                0 for the instrument's first tick carrying a volume and for
#                ticks without one (LTP and index packets)
#   candle     = OHLC of price by time, sum(increase), count(ticks),
#                vwap = sum(price * increase) / sum(increase) (128-bit
#                integers, rounded half away from zero to 1e-7; none when the
#                sum is 0), last open interest in the bucket.


cdef extern from *:
    """
    #define ING_INT64_MIN INT64_MIN
    """
    int64_t ING_INT64_MIN


cdef enum:
    # tickrow_t.flags: which nullable columns are present
    ROW_HAS_QUANTITY_ = 1
    ROW_HAS_VOLUME_ = 2
    ROW_HAS_OI_ = 4
    ROW_HAS_BOOK_ = 8
    ROW_HAS_EXCHANGE_TIME_ = 16
    # candle_t.flags
    CANDLE_HAS_VWAP_ = 1
    CANDLE_HAS_OI_ = 2
    CANDLE_REWRITE_ = 4     # a version of this candle may be stored already: upsert it
    # acc_t.flags
    ACC_OPEN = 1        # holds at least one tick
    ACC_EMITTED = 2     # already written out by advance()/flush()
    ACC_OI = 4          # oi holds a value
    ACC_STORED = 8      # seeded as already stored (with ACC_EMITTED): not a reopening
    ACC_WRITTEN = 16    # a version was written out (or seeded): its next one replaces it
    # statehead_t.flags
    STATE_HAS_VOLUME_ = 1
    STATE_SNAP_PENDING_ = 2
    STATE_SNAP_STORED_ = 4
    STATE_VERSION_ = 1
    # statistics
    ST_TICKS = 0
    ST_CANDLES
    ST_SNAPSHOTS
    ST_REOPENED         # a tick landed in a bucket advance() had written out
    # limits
    MAX_TIMEFRAMES = 64


ROW_HAS_QUANTITY = ROW_HAS_QUANTITY_
ROW_HAS_VOLUME = ROW_HAS_VOLUME_
ROW_HAS_OI = ROW_HAS_OI_
ROW_HAS_BOOK = ROW_HAS_BOOK_
ROW_HAS_EXCHANGE_TIME = ROW_HAS_EXCHANGE_TIME_
CANDLE_HAS_VWAP = CANDLE_HAS_VWAP_
CANDLE_HAS_OI = CANDLE_HAS_OI_
CANDLE_REWRITE = CANDLE_REWRITE_
STATE_HAS_VOLUME = STATE_HAS_VOLUME_
STATE_SNAP_PENDING = STATE_SNAP_PENDING_
STATE_SNAP_STORED = STATE_SNAP_STORED_
STATE_VERSION = STATE_VERSION_
ACC_FLAG_OPEN = ACC_OPEN
ACC_FLAG_EMITTED = ACC_EMITTED
ACC_FLAG_OI = ACC_OI

cdef acc_t _A
cdef statehead_t _H
cdef retraction_t _RT

#: A forming candle as kept by the engine (``acc_t``; ``pv = pv_hi << 64 | pv_lo``).
ACC_DTYPE = _dtype([
    ("start_us", "<i8", _off(&_A.start_us, &_A)),
    ("pv_lo", "<u8", _off(&_A.pv_lo, &_A)),
    ("pv_hi", "<u8", _off(&_A.pv_hi, &_A)),
    ("volume", "<u8", _off(&_A.volume, &_A)),
    ("open", "<u4", _off(&_A.open, &_A)),
    ("high", "<u4", _off(&_A.high, &_A)),
    ("low", "<u4", _off(&_A.low, &_A)),
    ("close", "<u4", _off(&_A.close, &_A)),
    ("count", "<u4", _off(&_A.count, &_A)),
    ("oi", "<u4", _off(&_A.oi, &_A)),
    ("flags", "<u4", _off(&_A.flags, &_A)),
], sizeof(acc_t))

#: A snapshot row superseded after a restart (``Engine.retracted``): delete it.
RETRACTION_DTYPE = _dtype([
    ("time_us", "<i8", _off(&_RT.time_us, &_RT)),
    ("instrument_id", "<i4", _off(&_RT.instrument_id, &_RT)),
    ("instrument_token", "<u4", _off(&_RT.instrument_token, &_RT)),
], sizeof(retraction_t))


def state_dtype(int ntf):
    """The record of ``Engine.take_state`` for ``ntf`` timeframes (little-endian, packed).

    ``version``, ``ntf``, ``flags`` (``STATE_*``), ``last_time_us``,
    ``instrument_id``, ``token``, ``last_volume``, ``book`` (a
    ``SNAPSHOT_DTYPE`` row), then per timeframe its length ``tf_us`` and its
    forming candle ``acc`` (``ACC_DTYPE``; ``flags`` 0: none).  The bytes
    of a record are what ``engine_state.state`` stores.
    """
    if not 1 <= ntf <= MAX_TIMEFRAMES:
        raise ValueError(f"ntf {ntf} outside 1..{MAX_TIMEFRAMES}")
    head = sizeof(statehead_t)
    return _dtype([
        ("version", "<u2", _off(&_H.version, &_H)),
        ("ntf", "<u2", _off(&_H.ntf, &_H)),
        ("flags", "<u4", _off(&_H.flags, &_H)),
        ("last_time_us", "<i8", _off(&_H.last_time_us, &_H)),
        ("instrument_id", "<i4", _off(&_H.instrument_id, &_H)),
        ("token", "<u4", _off(&_H.token, &_H)),
        ("last_volume", "<u4", _off(&_H.last_volume, &_H)),
        ("book", SNAPSHOT_DTYPE, _off(&_H.book, &_H)),
        ("tf_us", ("<i8", (ntf,)), head),
        ("acc", (ACC_DTYPE, (ntf,)), head + 8 * ntf),
    ], head + ntf * (8 + sizeof(acc_t)))

#: The timeframes of ``ohlc_candles`` (their labels are stored as ``timeframe``).
DEFAULT_TIMEFRAMES = ("1s", "5s", "1m", "5m", "15m", "1h", "1d")
_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


@cython.wraparound(True)
def timeframe_us(label):
    """Length in microseconds of a timeframe label such as ``"5s"``, ``"15m"``, ``"1d"``."""
    if not isinstance(label, str) or len(label) < 2 or label[-1] not in _UNIT_US \
            or not label[:-1].isdigit() or int(label[:-1]) <= 0:
        raise ValueError(f"bad timeframe {label!r}: want <n>s, <n>m, <n>h or <n>d")
    return int(label[:-1]) * _UNIT_US[label[-1]]


def _clock_us(value, what, bint signed):
    """Seconds (int), a timedelta, or "[+-]HH:MM[:SS]" -> microseconds."""
    import datetime
    if isinstance(value, datetime.timedelta):
        return (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    if isinstance(value, int):
        return value * 1_000_000
    if isinstance(value, str):
        text = value.strip()
        sign = 1
        if signed and text[:1] in "+-":
            sign = -1 if text[0] == "-" else 1
            text = text[1:]
        parts = text.split(":")
        if 2 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
            h, m = int(parts[0]), int(parts[1])
            sec = int(parts[2]) if len(parts) == 3 else 0
            if m < 60 and sec < 60:
                return sign * ((h * 60 + m) * 60 + sec) * 1_000_000
    raise ValueError(f"bad {what} {value!r}: want seconds, a timedelta or "
                     f"{'[+-]' if signed else ''}HH:MM[:SS]")


cdef inline int64_t _floordiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a / b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline int64_t _bucket(int64_t t, int64_t length, int64_t shift) noexcept nogil:
    return _floordiv(t + shift, length) * length - shift


cdef inline Py_ssize_t _hash(uint32_t token, Py_ssize_t mask) noexcept nogil:
    # Fibonacci hashing; tokens are dense in their low byte (the segment).
    cdef uint32_t h = token * <uint32_t>2654435761u
    return <Py_ssize_t>((h ^ (h >> 15)) & <uint32_t>mask)


cdef inline void _emit_candle(candle_t *c, const acc_t *a, const inst_t *inst,
                              int tf) noexcept nogil:
    c.time_us = a.start_us
    c.volume = <int64_t>a.volume
    c.trade_count = a.count
    c.instrument_id = inst.instrument_id
    c.instrument_token = inst.token
    c.open = a.open
    c.high = a.high
    c.low = a.low
    c.close = a.close
    c.divisor = inst.divisor
    c.timeframe = <uint8_t>tf
    c.flags = CANDLE_REWRITE_ if a.flags & ACC_WRITTEN else 0
    if a.volume:
        # The divisor divides 10^7 (100, 10^4 or 10^7): vwap * 10^7 is
        # pv * (10^7 / divisor) / volume, rounded once.
        c.vwap_e7 = ing_vwap_e7(a.pv_hi, a.pv_lo, a.volume, 10000000 // inst.divisor)
        c.flags |= CANDLE_HAS_VWAP_
    else:
        c.vwap_e7 = 0
    if a.flags & ACC_OI:
        c.open_interest = a.oi
        c.flags |= CANDLE_HAS_OI_
    else:
        c.open_interest = 0


@cython.final
cdef class _SourcePtr:
    # A raw pointer carried through Python-level argument handling.
    cdef const void *p

    @staticmethod
    cdef _SourcePtr make(const void *p):
        cdef _SourcePtr o = _SourcePtr.__new__(_SourcePtr)
        o.p = p
        return o


cdef class Engine:
    """Turn decoded Kite ticks into tick rows, candles and book snapshots.

    A synchronous stage of the pipeline: ``process(decoder)`` consumes a
    ``KiteDecoder``'s buffers and appends to three preallocated, reusable
    output buffers: ``tick_rows`` (``TICKROW_DTYPE``, one per tick, for
    ``tick_data``), ``candles`` (``CANDLE_DTYPE``, closed candles for
    ``ohlc_candles``) and ``snapshots`` (``SNAPSHOT_DTYPE``, for
    ``order_book_snapshots``), filled up to ``n_tick_rows``, ``n_candles``
    and ``n_snapshots``.  ``output()`` gives those filled parts as views and
    ``clear()`` empties the buffers for reuse.

    Every instrument needs an id before its ticks are processed:
    ``unknown_tokens(decoder)`` lists the tokens without one, and
    ``set_instrument``/``set_instruments`` give them.

    Buffer protocol: ``process`` works message by message (ticks sharing a
    ``seq``) and before each message checks that the outputs have room for
    its worst case (a row, a closed candle per timeframe and a snapshot per
    tick).  When they do not, it stops at that message boundary and returns
    the decoder row it stopped at; the caller writes out ``output()``,
    calls ``clear()`` and calls ``process(decoder, start=that_row)``.  So a
    drained batch always covers whole messages, up to ``last_seq``.  A
    single message larger than empty buffers grows them.  ``advance`` and
    ``flush`` return False when the candle or snapshot buffer fills: drain,
    clear and call them again (they continue where they stopped).

    Restart state: ``take_state()`` gives the continuation state of the
    instruments changed since its last call (commit it with the batch it
    belongs to); a fresh engine seeded from it (``seed``, ``seed_candle``,
    ``seed_book``: ``ingestor.pipeline.state``) goes on exactly, snapshots
    included.

    Threads: the per-tick loops (``process``, ``advance``, ``flush``) run
    without the GIL, on data validated beforehand.  One thread at a time
    may use an engine; a call while another thread is inside one of those
    loops raises RuntimeError.

    Parameters
    ----------
    timeframes : sequence of str
        Candle timeframe labels (``<n>s``, ``<n>m``, ``<n>h``, ``<n>d``); the
        index of a label is ``candle.timeframe``.
    utc_offset : int, timedelta or str
        Fixed offset of the exchange's local time from UTC (seconds or
        ``"+05:30"``; no DST): buckets align to local midnight.
    origin : int, timedelta or str
        Local time of day the buckets are aligned to (``"09:15"`` gives
        session-aligned hours and days).
    snapshot_interval_us : int
        At most one book snapshot per instrument per interval of this many
        microseconds (aligned like the candles), holding the interval's last
        book with its tick's time, written when a later interval's book
        arrives or by ``advance``/``flush``; 0 writes one per full packet.
        ``flush`` writes an open interval's book so far and keeps it
        pending: if the interval goes on (after a restart from
        ``take_state``), the later book replaces that row (``retracted``).
    tick_capacity, candle_capacity, snapshot_capacity : int
        Output buffer sizes (rows).
    instrument_capacity : int
        Initial number of instrument slots (the table grows as needed).
    """

    def __cinit__(self, timeframes=DEFAULT_TIMEFRAMES, utc_offset="+05:30", origin="00:00",
                  int64_t snapshot_interval_us=1_000_000, Py_ssize_t tick_capacity=16384,
                  Py_ssize_t candle_capacity=65536, Py_ssize_t snapshot_capacity=16384,
                  Py_ssize_t instrument_capacity=1024):
        cdef Py_ssize_t i
        self.timeframes = tuple(timeframes)
        if not 1 <= len(self.timeframes) <= MAX_TIMEFRAMES:
            raise ValueError(f"between 1 and {MAX_TIMEFRAMES} timeframes, got {len(self.timeframes)}")
        if len(set(self.timeframes)) != len(self.timeframes):
            raise ValueError(f"repeated timeframe in {self.timeframes}")
        lengths = [timeframe_us(tf) for tf in self.timeframes]
        self.utc_offset_us = _clock_us(utc_offset, "utc_offset", True)
        self.origin_us = _clock_us(origin, "origin", False)
        if not -86_400_000_000 < self.utc_offset_us < 86_400_000_000:
            raise ValueError(f"utc_offset {utc_offset!r} is not within a day")
        if not 0 <= self.origin_us < 86_400_000_000:
            raise ValueError(f"origin {origin!r} is not a time of day")
        if snapshot_interval_us < 0:
            raise ValueError("snapshot_interval_us must be >= 0")
        if min(tick_capacity, candle_capacity, snapshot_capacity, instrument_capacity) < 1:
            raise ValueError("capacities must be positive")
        self.snapshot_interval_us = snapshot_interval_us
        self.state_dtype = state_dtype(len(lengths))
        self._shift = self.utc_offset_us - self.origin_us
        self._ntf = len(lengths)
        self._tf_len = <int64_t *>malloc(self._ntf * sizeof(int64_t))
        if self._tf_len == NULL:
            raise MemoryError()
        for i in range(self._ntf):
            self._tf_len[i] = lengths[i]
        self._n_slots = 0
        self._cap_slots = 0
        self._hmask = -1
        self._grow_slots(instrument_capacity)
        self._cap_rows = self._cap_candles = self._cap_snaps = 0
        self._grow_outputs(tick_capacity, candle_capacity, snapshot_capacity)
        self.last_seq = -1
        memset(self._stats, 0, sizeof(self._stats))

    def __dealloc__(self):
        free(self._tf_len)
        free(self._inst)
        free(self._acc)
        free(self._hkeys)
        free(self._hvals)
        free(self._scratch)

    # -- instrument slots ---------------------------------------------------

    cdef Py_ssize_t _slot(self, uint32_t token) noexcept nogil:
        cdef Py_ssize_t h = _hash(token, self._hmask)
        cdef int32_t v
        while True:
            v = self._hvals[h]
            if v < 0:
                return -1
            if self._hkeys[h] == token:
                return v
            h = (h + 1) & self._hmask

    def _grow_slots(self, Py_ssize_t need):
        # Grow the slot arrays to ``need`` slots and the hash table to at
        # least twice that (power of two), rehashing.
        cdef Py_ssize_t cap, hcap, i, h
        cdef inst_t *inst
        cdef acc_t *acc
        cdef uint32_t *keys
        cdef int32_t *vals
        if need <= self._cap_slots:
            return
        cap = max(need, 2 * self._cap_slots)
        inst = <inst_t *>realloc(self._inst, cap * sizeof(inst_t))
        if inst == NULL:
            raise MemoryError()
        self._inst = inst
        acc = <acc_t *>realloc(self._acc, cap * self._ntf * sizeof(acc_t))
        if acc == NULL:
            raise MemoryError()
        self._acc = acc
        memset(acc + self._cap_slots * self._ntf, 0,
               (cap - self._cap_slots) * self._ntf * sizeof(acc_t))
        books = np.zeros(cap, dtype=SNAPSHOT_DTYPE)
        if self._n_slots:
            books[:self._n_slots] = self.books[:self._n_slots]
        self.books = books
        self._books = <snapshot_t *>cnp.PyArray_DATA(books)
        self._cap_slots = cap
        hcap = 16
        while hcap < 2 * cap:
            hcap *= 2
        if hcap - 1 > self._hmask:
            keys = <uint32_t *>malloc(hcap * sizeof(uint32_t))
            vals = <int32_t *>malloc(hcap * sizeof(int32_t))
            if keys == NULL or vals == NULL:
                free(keys)
                free(vals)
                raise MemoryError()
            free(self._hkeys)
            free(self._hvals)
            self._hkeys = keys
            self._hvals = vals
            self._hmask = hcap - 1
            for i in range(hcap):
                vals[i] = -1
            for i in range(self._n_slots):
                h = _hash(self._inst[i].token, self._hmask)
                while vals[h] >= 0:
                    h = (h + 1) & self._hmask
                keys[h] = self._inst[i].token
                vals[h] = <int32_t>i

    cdef Py_ssize_t _new_slot(self, uint32_t token) except -1:
        cdef Py_ssize_t s = self._slot(token)
        cdef Py_ssize_t h
        cdef inst_t *inst
        if s >= 0:
            return s
        if self._n_slots >= 0x7fffffff:
            raise OverflowError("too many instruments")
        if self._n_slots == self._cap_slots:
            self._grow_slots(self._n_slots + 1)
        s = self._n_slots
        inst = &self._inst[s]
        memset(inst, 0, sizeof(inst_t))
        inst.token = token
        inst.instrument_id = -1
        inst.last_time_us = ING_INT64_MIN
        inst.divisor = _divisor(token & 0xff)
        memset(&self._books[s], 0, sizeof(snapshot_t))
        self._books[s].instrument_token = token
        self._books[s].instrument_id = -1
        self._books[s].divisor = inst.divisor
        h = _hash(token, self._hmask)
        while self._hvals[h] >= 0:
            h = (h + 1) & self._hmask
        self._hkeys[h] = token
        self._hvals[h] = <int32_t>s
        self._n_slots += 1
        return s

    def set_instrument(self, uint32_t token, int32_t instrument_id):
        """Give ``token`` its ``instruments.id`` (its ticks' ``instrument_id``)."""
        cdef Py_ssize_t s
        if instrument_id < 0:
            raise ValueError(f"instrument_id must be >= 0, got {instrument_id}")
        s = self._new_slot(token)
        self._inst[s].instrument_id = instrument_id
        self._books[s].instrument_id = instrument_id

    def set_instruments(self, tokens, instrument_ids):
        """Vectorized ``set_instrument`` over two equal-length integer arrays."""
        t = np.ascontiguousarray(tokens, dtype=np.uint32)
        ids = np.ascontiguousarray(instrument_ids, dtype=np.int64)
        if t.shape != ids.shape or t.ndim != 1:
            raise ValueError("tokens and instrument_ids must be 1-d arrays of one length")
        if ids.size and (ids.min() < 0 or ids.max() > 0x7fffffff):
            raise ValueError("instrument ids must be in 0..2^31-1")
        self._grow_slots(self._n_slots + t.size)
        cdef const uint32_t[::1] tv = t
        cdef const int64_t[::1] iv = ids
        cdef Py_ssize_t i, s
        for i in range(tv.shape[0]):
            s = self._new_slot(tv[i])
            self._inst[s].instrument_id = <int32_t>iv[i]
            self._books[s].instrument_id = <int32_t>iv[i]

    def instrument_id(self, uint32_t token):
        """The id given to ``token``, or None."""
        cdef Py_ssize_t s = self._slot(token)
        if s < 0 or self._inst[s].instrument_id < 0:
            return None
        return self._inst[s].instrument_id

    def seed(self, uint32_t token, int64_t last_time_us, last_cum_volume=None):
        """Continue an instrument from stored state (a restarted daemon).

        Parameters
        ----------
        token : int
            The instrument token.
        last_time_us : int
            The instrument's last stored ``tick_data.time`` (µs): later
            ticks get strictly later times.
        last_cum_volume : int or None
            Its last stored cumulative volume (None: no tick carried one),
            from which the next tick's volume increase is measured.
        """
        cdef Py_ssize_t s = self._new_slot(token)
        cdef inst_t *inst = &self._inst[s]
        cdef acc_t *a = self._acc + s * self._ntf
        cdef int f
        if last_cum_volume is not None and not 0 <= last_cum_volume <= 0xffffffff:
            raise ValueError(f"last_cum_volume {last_cum_volume} is not a uint32")
        for f in range(self._ntf):
            # later ticks must not land before a forming candle (seed_candle)
            if (a[f].flags & ACC_OPEN) and last_time_us < a[f].start_us:
                raise ValueError(f"last_time_us {last_time_us} is before the forming "
                                 f"{self.timeframes[f]} candle of token {token} "
                                 f"(starting {a[f].start_us})")
        inst.last_time_us = last_time_us
        if last_cum_volume is None:
            inst.has_volume = 0
            inst.last_volume = 0
        else:
            inst.has_volume = 1
            inst.last_volume = <uint32_t>last_cum_volume

    def seed_candle(self, uint32_t token, int timeframe_index, int64_t start_us, open, high,
                    low, close, volume, trade_count, pv, oi=None, bint stored=False):
        """Restore a forming candle from stored ticks (a restarted daemon).

        Later ticks of the instrument in the same bucket continue it exactly
        as if the engine had seen the bucket's earlier ticks; a tick in a
        later bucket closes it and writes it out as usual.  It replaces any
        forming candle of that instrument and timeframe.  ``ingestor.pipeline.state``
        computes the values from ``tick_data``.

        With ``stored`` False the candle counts as not yet written out:
        ``advance``, ``flush``, ``open_candles`` and a later bucket's tick
        write it (repairing a stored row that is missing or stale, as after
        a crash).  With ``stored`` True the caller vouches that the database
        already holds exactly this candle: it is written again only once a
        tick continues it (and that is not counted as a reopened bucket).

        Call ``set_instrument`` (the candle may be written out before any
        tick arrives) and ``seed`` first: the instrument's last time must not
        be before ``start_us`` (later ticks never land before their candle).

        Parameters
        ----------
        token : int
            The instrument token.
        timeframe_index : int
            Index of the timeframe in ``timeframes``.
        start_us : int
            The bucket start (µs); must be one of this timeframe's bucket
            starts (aligned to ``utc_offset`` and ``origin``).
        open, high, low, close : int
            Raw prices (price × the segment's divisor) of the bucket's ticks.
        volume : int
            Sum of the ticks' volume increases (see the module comment).
        trade_count : int
            Number of ticks in the bucket (at least 1).
        pv : int
            Exact sum of raw price × volume increase (up to 128 bits).
        oi : int or None
            The bucket's last open interest (None: no tick carried one).
        stored : bool
            The database already holds this very candle.

        Raises
        ------
        ValueError
            A misaligned ``start_us``, a bad index, values out of their
            ranges or inconsistent (``low <= open, close <= high``;
            ``low * volume <= pv <= high * volume``), an instrument without
            an id, or its seeded last time before ``start_us``.
        """
        cdef Py_ssize_t s
        cdef acc_t *a
        cdef int64_t length
        if not 0 <= timeframe_index < self._ntf:
            raise ValueError(f"timeframe_index {timeframe_index} outside 0..{self._ntf - 1}")
        length = self._tf_len[timeframe_index]
        if _bucket(start_us, length, self._shift) != start_us:
            raise ValueError(f"start_us {start_us} is not a {self.timeframes[timeframe_index]} "
                             f"bucket start (nearest below: "
                             f"{_bucket(start_us, length, self._shift)})")
        for name, v in (("open", open), ("high", high), ("low", low), ("close", close)):
            if not 0 <= v <= 0xffffffff:
                raise ValueError(f"{name} {v} is not a uint32 raw price")
        if not low <= min(open, close) <= max(open, close) <= high:
            raise ValueError(f"inconsistent prices: open {open} high {high} low {low} "
                             f"close {close}")
        if not 0 <= volume <= 0x7fffffffffffffff:
            raise ValueError(f"volume {volume} is not a non-negative int64")
        if not 1 <= trade_count <= 0xffffffff:
            raise ValueError(f"trade_count {trade_count} outside 1..2^32-1")
        # pv is a sum of prices in [low, high] weighted by the increases, so it
        # lies in [low, high] x volume (this also keeps it below 2^95, as the
        # VWAP division in wide.h requires).
        if not low * volume <= pv <= high * volume:
            raise ValueError(f"pv {pv} outside [low x volume, high x volume] = "
                             f"[{low * volume}, {high * volume}]")
        if oi is not None and not 0 <= oi <= 0xffffffff:
            raise ValueError(f"oi {oi} is not a uint32")
        s = self._slot(token)
        if s < 0 or self._inst[s].instrument_id < 0:
            # the candle may be written out before any tick of the instrument arrives
            raise ValueError(f"token {token} has no instrument id: set_instrument() first")
        if self._inst[s].last_time_us < start_us:
            raise ValueError(f"token {token}: seed() its last time (at or after the bucket "
                             f"start {start_us}) before seed_candle()")
        a = self._acc + s * self._ntf + timeframe_index
        a.start_us = start_us
        a.open = <uint32_t>open
        a.high = <uint32_t>high
        a.low = <uint32_t>low
        a.close = <uint32_t>close
        a.count = <uint32_t>trade_count
        a.volume = <uint64_t>volume
        a.pv_lo = <uint64_t>(pv & 0xffffffffffffffff)
        a.pv_hi = <uint64_t>(pv >> 64)
        # seeded: some version may be stored (upserted while forming), so it is rewritten
        a.flags = ACC_OPEN | ACC_WRITTEN | (ACC_EMITTED | ACC_STORED if stored else 0)
        if oi is None:
            a.oi = 0
        else:
            a.oi = <uint32_t>oi
            a.flags |= ACC_OI

    def seed_book(self, uint32_t token, book, bint pending=False, bint stored=False):
        """Restore an instrument's latest book and its snapshot state (a restarted daemon).

        Parameters
        ----------
        token : int
            The instrument token (``set_instrument`` and ``seed`` first).
        book : numpy record or array of one ``SNAPSHOT_DTYPE`` row
            The latest book with its tick's ``time_us`` (its id, token and
            divisor are the engine's own).
        pending : bool
            The book is the open interval's, its snapshot not yet final: a
            later book of the same interval replaces it, a tick of a later
            interval (or ``advance``/``flush``) writes it.
        stored : bool
            ``flush()`` already wrote it (a shutdown mid-interval): it is not
            written again, and a later book of the interval retracts that row
            (``retracted()``).
        """
        cdef Py_ssize_t s = self._slot(token)
        cdef inst_t *inst
        cdef snapshot_t *bk
        cdef const snapshot_t *src
        cdef int64_t ivl = self.snapshot_interval_us
        if s < 0 or self._inst[s].instrument_id < 0:
            raise ValueError(f"token {token} has no instrument id: set_instrument() first")
        b = np.ascontiguousarray(np.asarray(book).reshape(-1))
        if b.dtype != SNAPSHOT_DTYPE or b.shape[0] != 1:
            raise TypeError("book must be one SNAPSHOT_DTYPE row")
        src = <const snapshot_t *>cnp.PyArray_DATA(b)
        inst = &self._inst[s]
        if pending and src.time_us > inst.last_time_us:
            raise ValueError(f"token {token}: the pending book's time {src.time_us} is after "
                             f"the seeded last time {inst.last_time_us}: seed() first")
        bk = &self._books[s]
        bk.time_us = src.time_us
        bk.total_bid_quantity = src.total_bid_quantity
        bk.total_ask_quantity = src.total_ask_quantity
        memcpy(&bk.book, &src.book, sizeof(levels_t))
        if pending and ivl > 0:
            inst.snap_pending = 1
            inst.snap_stored = stored
            # the interval from the current setting (it may have changed since)
            inst.snap_end_us = _bucket(src.time_us, ivl, self._shift) + ivl
        else:
            inst.snap_pending = 0
            inst.snap_stored = 0

    def touch(self, uint32_t token):
        """Include the instrument in the next ``take_state()`` (state seeded from elsewhere)."""
        cdef Py_ssize_t s = self._slot(token)
        if s < 0 or self._inst[s].instrument_id < 0:
            raise ValueError(f"token {token} has no instrument id")
        self._inst[s].dirty = 1

    def last_times(self, tokens):
        """Each token's last time (µs; ``INT64_MIN``: no tick and no seed), an int64 array.

        What the engine's per-instrument clock stands at: a tick at or before it
        would be restamped just after it.  ``Pipeline`` compares a stream's first
        tick of an instrument with it to tell a backfill from a late tick.
        """
        t = np.ascontiguousarray(tokens, dtype=np.uint32)
        out = np.full(t.shape[0], ING_INT64_MIN, dtype=np.int64)
        cdef const uint32_t[::1] tv = t
        cdef int64_t[::1] ov = out
        cdef Py_ssize_t i, s
        for i in range(tv.shape[0]):
            s = self._slot(tv[i])
            if s >= 0:
                ov[i] = self._inst[s].last_time_us
        return out

    def park(self, uint32_t token, bint parked=True):
        """Set an instrument aside while its ticks go to another engine (a backfill).

        A parked instrument's forming candles and pending book are not written
        by ``advance``, ``flush`` or ``open_candles``, and ``take_state`` leaves
        it out: the state committed for it (its clock, its forming candles) stays
        as the database has it, neither moved back nor rewritten.  Its ticks
        must not be given to this engine while it is parked.
        """
        cdef Py_ssize_t s = self._slot(token)
        if s < 0:
            if not parked:
                return
            s = self._new_slot(token)
        self._inst[s].parked = parked

    def take_state(self, bint all=False):
        """The continuation state of the instruments changed since the last call.

        What a restarted engine needs to go on exactly as if it had not
        stopped (``state_dtype``): the last time and cumulative volume, the
        latest book and whether it is a pending (or flushed) snapshot, and
        every forming candle with its exact 128-bit price x volume sum.  The
        pipeline hands it out with each batch, so it is committed with the
        rows and offset it belongs to; ``ingestor.pipeline.state`` seeds a
        new engine from it (``seed``, ``seed_candle``, ``seed_book``).

        Parameters
        ----------
        all : bool
            Every instrument with a tick or a seeded time, changed or not.

        Returns
        -------
        numpy.ndarray
            ``state_dtype`` records, one per instrument, in slot order; the
            instruments' "changed" marks are cleared.
        """
        cdef Py_ssize_t s, n = 0, k = 0, size
        cdef int ntf = self._ntf
        cdef inst_t *inst
        cdef statehead_t *h
        cdef int64_t *tf
        cdef char *base
        self._enter()
        try:
            for s in range(self._n_slots):
                inst = &self._inst[s]
                if inst.instrument_id >= 0 and not inst.parked and (inst.dirty or (
                        all and inst.last_time_us != ING_INT64_MIN)):
                    n += 1
            out = np.zeros(n, dtype=self.state_dtype)
            base = <char *>cnp.PyArray_DATA(out)
            size = self.state_dtype.itemsize
            for s in range(self._n_slots):
                inst = &self._inst[s]
                if not (inst.instrument_id >= 0 and not inst.parked and (inst.dirty or (
                        all and inst.last_time_us != ING_INT64_MIN))):
                    continue
                h = <statehead_t *>(base + k * size)
                h.version = STATE_VERSION_
                h.ntf = <uint16_t>ntf
                h.flags = 0
                if inst.has_volume:
                    h.flags |= STATE_HAS_VOLUME_
                if inst.snap_pending:
                    h.flags |= STATE_SNAP_PENDING_
                    if inst.snap_stored:
                        h.flags |= STATE_SNAP_STORED_
                h.last_time_us = inst.last_time_us
                h.instrument_id = inst.instrument_id
                h.token = inst.token
                h.last_volume = inst.last_volume
                h.book = self._books[s]
                tf = <int64_t *>(base + k * size + sizeof(statehead_t))
                memcpy(tf, self._tf_len, ntf * sizeof(int64_t))
                memcpy(tf + ntf, self._acc + s * ntf, ntf * sizeof(acc_t))
                inst.dirty = 0
                k += 1
        finally:
            self._busy = False
        return out

    @property
    def n_instruments(self):
        """Instrument slots in use (``books[:n_instruments]`` are their books)."""
        return self._n_slots

    def latest_books(self):
        """The latest book of every instrument slot (a view: ``SNAPSHOT_DTYPE``).

        Rows of instruments without a full packet yet are zeros apart from
        the token, id and divisor (``time_us`` 0).
        """
        return self.books[:self._n_slots]

    # -- input --------------------------------------------------------------

    def unknown_tokens(self, source, Py_ssize_t start=0):
        """Tokens in ``source`` (a KiteDecoder or a TICK_DTYPE array) without an id.

        Returns
        -------
        numpy.ndarray
            Sorted unique uint32 tokens; give each an id with
            ``set_instrument`` before ``process``.
        """
        cdef const tick_t *ticks
        cdef _SourcePtr tp
        cdef Py_ssize_t n, i, k = 0, s
        cdef uint32_t tok
        tpo, n, _, _ = self._source(source)
        tp = <_SourcePtr>tpo
        ticks = <const tick_t *>tp.p
        out = np.empty(max(0, n - start), dtype=np.uint32)
        cdef uint32_t[::1] ov = out
        for i in range(max(0, start), n):
            tok = ticks[i].instrument_token
            s = self._slot(tok)
            if s < 0 or self._inst[s].instrument_id < 0:
                ov[k] = tok
                k += 1
        return np.unique(out[:k])

    def first_unseen(self, source, Py_ssize_t start=0):
        """The first tick of each instrument in ``source[start:]`` (a KiteDecoder or a
        TICK_DTYPE array) that this method has not met since ``forget_seen``, and marks
        those instruments met.

        One pass, no sort: what lets ``Pipeline`` judge each instrument's first tick of a
        stream (a backfill or not) without sorting every chunk's tokens.  A token without
        a slot has no mark to keep: it is returned at its first tick of every call.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            The tokens (uint32) in the order of their first tick, and those ticks'
            indexes into ``source`` (int64).
        """
        cdef const tick_t *ticks
        cdef _SourcePtr tp
        cdef Py_ssize_t n, i, s, k = 0
        cdef uint32_t tok
        tpo, n, _, _ = self._source(source)
        tp = <_SourcePtr>tpo
        ticks = <const tick_t *>tp.p
        toks = np.empty(max(0, n - start), dtype=np.uint32)
        idx = np.empty(max(0, n - start), dtype=np.int64)
        cdef uint32_t[::1] tv = toks
        cdef int64_t[::1] iv = idx
        cdef set slotless = None
        for i in range(max(0, start), n):
            tok = ticks[i].instrument_token
            s = self._slot(tok)
            if s >= 0:
                if self._inst[s].seen:
                    continue
                self._inst[s].seen = 1
            else:
                if slotless is None:
                    slotless = set()
                if tok in slotless:
                    continue
                slotless.add(tok)
            tv[k] = tok
            iv[k] = i
            k += 1
        return toks[:k], idx[:k]

    def forget_seen(self):
        """Every instrument unmet again by ``first_unseen`` (a new stream)."""
        cdef Py_ssize_t s
        for s in range(self._n_slots):
            self._inst[s].seen = 0

    def _source(self, source, n_ticks=None, depth=None, n_depth=None):
        # -> (tick pointer, n_ticks, depth pointer, n_depth), validated.
        cdef KiteDecoder dec
        if isinstance(source, KiteDecoder):
            dec = <KiteDecoder>source
            return _SourcePtr.make(<const void *>dec._ticks), dec.n_ticks, \
                _SourcePtr.make(<const void *>dec._depth), dec.n_depth
        if not isinstance(source, np.ndarray) or source.dtype != TICK_DTYPE \
                or source.ndim != 1 or not source.flags.c_contiguous:
            raise TypeError("source must be a KiteDecoder or a 1-d contiguous TICK_DTYPE array")
        n = source.shape[0] if n_ticks is None else n_ticks
        if not 0 <= n <= source.shape[0]:
            raise ValueError(f"n_ticks {n} outside 0..{source.shape[0]}")
        if depth is None:
            return _SourcePtr.make(cnp.PyArray_DATA(source)), n, _SourcePtr.make(NULL), 0
        if not isinstance(depth, np.ndarray) or depth.dtype != DEPTH_DTYPE \
                or depth.ndim != 1 or not depth.flags.c_contiguous:
            raise TypeError("depth must be a 1-d contiguous DEPTH_DTYPE array")
        nd = depth.shape[0] if n_depth is None else n_depth
        if not 0 <= nd <= depth.shape[0]:
            raise ValueError(f"n_depth {nd} outside 0..{depth.shape[0]}")
        return _SourcePtr.make(cnp.PyArray_DATA(source)), n, \
            _SourcePtr.make(cnp.PyArray_DATA(depth)), nd

    cdef int _resolve(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                      Py_ssize_t n_depth) except -1:
        # Map ticks[start:n] to slots in the scratch array and validate what
        # the hot loop relies on, before any state changes.
        cdef Py_ssize_t i, s, cap
        cdef Py_ssize_t missing = 0
        cdef const tick_t *tk
        cdef int32_t *p
        if n - start > self._cap_scratch:
            cap = max(n - start, 2 * self._cap_scratch)
            p = <int32_t *>realloc(self._scratch, cap * sizeof(int32_t))
            if p == NULL:
                raise MemoryError()
            self._scratch = p
            self._cap_scratch = cap
        p = self._scratch
        cdef Py_ssize_t bad = -1
        cdef int why = 0
        with nogil:
            for i in range(start, n):
                tk = &ticks[i]
                s = self._slot(tk.instrument_token)
                if s < 0 or self._inst[s].instrument_id < 0:
                    missing += 1
                    continue
                p[i - start] = <int32_t>s
                if tk.length == 184 and (tk.depth_row < 0 or tk.depth_row >= n_depth):
                    bad, why = i, 1
                    break
                if tk.divisor != self._inst[s].divisor:
                    bad, why = i, 2
                    break
        if why == 1:
            raise ValueError(f"tick row {bad}: depth_row {ticks[bad].depth_row} outside "
                             f"the {n_depth} depth rows")
        if why == 2:
            raise ValueError(f"tick row {bad}: divisor {ticks[bad].divisor} is not the "
                             f"segment's {self._inst[p[bad - start]].divisor}")
        if missing:
            raise LookupError(f"{missing} ticks of instruments without an id: "
                              f"call unknown_tokens() and set_instrument() first")
        return 0

    def process(self, source, Py_ssize_t start=0, n_ticks=None, depth=None, n_depth=None):
        """Aggregate decoded ticks from row ``start`` on.

        Parameters
        ----------
        source : KiteDecoder or numpy.ndarray
            A decoder (its ``ticks[:n_ticks]`` and ``depth``), or a
            ``TICK_DTYPE`` array with ``n_ticks`` rows used and the
            ``DEPTH_DTYPE`` array ``depth`` its ``depth_row`` points into.
        start : int
            The first tick row to process (where the last call stopped).

        Returns
        -------
        int
            The row processing stopped at: the end of the ticks, or an
            earlier message boundary when the output buffers are full (drain
            ``output()``, ``clear()``, call again with this ``start``).

        Raises
        ------
        LookupError
            A tick this call would process belongs to an instrument without
            an id: nothing of this call is processed.  Call
            ``unknown_tokens`` over the whole batch first.
        """
        cdef _SourcePtr tp, dp
        tpo, n, dpo, nd = self._source(source, n_ticks, depth, n_depth)
        tp = <_SourcePtr>tpo
        dp = <_SourcePtr>dpo
        if not 0 <= start <= n:
            raise ValueError(f"start {start} outside 0..{n}")
        cdef const tick_t *ticks = <const tick_t *>tp.p
        # Work on a window of what the tick-row buffer can take (extended to
        # a message boundary), so a batch drained in many calls is resolved
        # once, not once per call.
        cdef Py_ssize_t end = start + max(1, self._cap_rows - self.n_tick_rows)
        if end >= n:
            end = n
        else:
            while end < n and ticks[end].seq == ticks[end - 1].seq:
                end += 1
        self._enter()
        try:
            self._resolve(ticks, start, end, nd)
            return self._run(ticks, start, end, <const depth_t *>dp.p)
        finally:
            self._busy = False

    cdef int _grow_outputs(self, Py_ssize_t rows, Py_ssize_t candles,
                           Py_ssize_t snaps) except -1:
        # Grow (never shrink) the output buffers; called with them empty or
        # at construction, so nothing needs copying.
        if rows > self._cap_rows:
            self.tick_rows = np.zeros(rows, dtype=TICKROW_DTYPE)
            self._rows = <tickrow_t *>cnp.PyArray_DATA(self.tick_rows)
            self._cap_rows = rows
        if candles > self._cap_candles:
            self.candles = np.zeros(candles, dtype=CANDLE_DTYPE)
            self._candles = <candle_t *>cnp.PyArray_DATA(self.candles)
            self._cap_candles = candles
        if snaps > self._cap_snaps:
            self.snapshots = np.zeros(snaps, dtype=SNAPSHOT_DTYPE)
            self._snaps = <snapshot_t *>cnp.PyArray_DATA(self.snapshots)
            # at most one retraction per snapshot-carrying tick: the same capacity
            self.retractions = np.zeros(snaps, dtype=RETRACTION_DTYPE)
            self._retr = <retraction_t *>cnp.PyArray_DATA(self.retractions)
            self._cap_snaps = snaps
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _run(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                         const depth_t *depth) except -1:
        # The loop runs without the GIL (the event loop and the pipeline thread use both
        # cores); ``_resolve`` validated what it reads.  It returns early only when one
        # message is larger than the empty output buffers: grow them here and go on.
        # (the caller holds the engine: ``_enter``)
        cdef Py_ssize_t need = 0
        cdef Py_ssize_t i = start
        while True:
            with nogil:
                i = self._run_nogil(ticks, i, n, depth, start, &need)
            if not need:
                return i
            self._grow_outputs(need, need * self._ntf, need)
            need = 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _run_nogil(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                               const depth_t *depth, Py_ssize_t base,
                               Py_ssize_t *need) noexcept nogil:
        # ``base``: the row ``_resolve`` mapped into the scratch array's first slot
        cdef Py_ssize_t i = start
        cdef Py_ssize_t j, k, m
        cdef int f
        cdef int ntf = self._ntf
        cdef const int64_t *tflen = self._tf_len
        cdef int64_t shift = self._shift
        cdef int64_t ivl = self.snapshot_interval_us
        cdef int64_t seq, t
        cdef const tick_t *tk
        cdef const levels_t *lv
        cdef inst_t *inst
        cdef acc_t *a
        cdef acc_t *acc = self._acc
        cdef tickrow_t *row
        cdef snapshot_t *bk
        cdef const int32_t *slots = self._scratch - base
        cdef int32_t s
        cdef uint32_t price, vol, dv
        cdef uint64_t pv
        cdef uint16_t length
        cdef bint has_q, has_oi
        cdef Py_ssize_t nrows = self.n_tick_rows
        cdef Py_ssize_t ncand = self.n_candles
        cdef Py_ssize_t nsnap = self.n_snapshots
        cdef Py_ssize_t nretr = self.n_retractions
        cdef Py_ssize_t ncand0 = ncand
        cdef Py_ssize_t nsnap0 = nsnap
        cdef Py_ssize_t start0 = start
        cdef uint64_t reopened = 0
        while i < n:
            # One message: the ticks sharing a sequence number.
            seq = ticks[i].seq
            j = i + 1
            while j < n and ticks[j].seq == seq:
                j += 1
            m = j - i
            if (nrows + m > self._cap_rows or ncand + m * ntf > self._cap_candles
                    or nsnap + m > self._cap_snaps or nretr + m > self._cap_snaps):
                if not (nrows or ncand or nsnap or nretr):
                    need[0] = m     # larger than the empty buffers: the caller grows them
                break
            for k in range(i, j):
                tk = &ticks[k]
                s = slots[k]
                inst = &self._inst[s]
                inst.dirty = 1
                length = tk.length
                # time: receive time in µs, strictly increasing per instrument
                t = _floordiv(tk.recv_ns, 1000)
                if t <= inst.last_time_us:
                    t = inst.last_time_us + 1
                inst.last_time_us = t
                price = tk.last_price
                has_q = length == 44 or length == 184
                has_oi = length == 184
                row = &self._rows[nrows]
                nrows += 1
                row.time_us = t
                row.seq = tk.seq
                row.instrument_id = inst.instrument_id
                row.instrument_token = tk.instrument_token
                row.price = price
                row.divisor = tk.divisor
                row.segment = tk.segment
                row.mode = tk.mode
                row.flags = 0
                row.quantity = 0
                row.volume = 0
                row.oi = 0
                row.bid_price = 0
                row.bid_quantity = 0
                row.ask_price = 0
                row.ask_quantity = 0
                dv = 0
                if has_q:
                    vol = tk.volume_traded
                    row.quantity = tk.last_traded_quantity
                    row.volume = vol
                    row.flags = ROW_HAS_QUANTITY_ | ROW_HAS_VOLUME_
                    if inst.has_volume:
                        dv = vol - inst.last_volume if vol >= inst.last_volume else vol
                    inst.last_volume = vol
                    inst.has_volume = 1
                if has_oi:
                    lv = &depth[tk.depth_row].book
                    row.oi = tk.oi
                    row.bid_price = lv.bid_price[0]
                    row.bid_quantity = lv.bid_quantity[0]
                    row.ask_price = lv.ask_price[0]
                    row.ask_quantity = lv.ask_quantity[0]
                    row.flags |= ROW_HAS_OI_ | ROW_HAS_BOOK_
                if tk.exchange_timestamp:
                    row.exchange_time_us = (<int64_t>tk.exchange_timestamp * 1000000
                                            + <int64_t>tk.exchange_ms * 1000)
                    row.flags |= ROW_HAS_EXCHANGE_TIME_
                else:
                    row.exchange_time_us = 0
                # candles
                pv = <uint64_t>price * dv
                a = acc + <Py_ssize_t>s * ntf
                for f in range(ntf):
                    if INGESTOR_DEBUG:
                        if (a.flags & ACC_OPEN) and t < a.start_us:
                            abort()
                    if (a.flags & ACC_OPEN) and t - a.start_us < tflen[f]:
                        if price > a.high:
                            a.high = price
                        if price < a.low:
                            a.low = price
                        a.close = price
                        a.count += 1
                        a.volume += dv
                        a.pv_lo += pv
                        a.pv_hi += a.pv_lo < pv
                        if a.flags & ACC_EMITTED:
                            if not (a.flags & ACC_STORED):
                                reopened += 1
                            a.flags &= ~(ACC_EMITTED | ACC_STORED)
                    else:
                        if (a.flags & (ACC_OPEN | ACC_EMITTED)) == ACC_OPEN:
                            _emit_candle(&self._candles[ncand], a, inst, f)
                            ncand += 1
                        a.start_us = _bucket(t, tflen[f], shift)
                        a.open = a.high = a.low = a.close = price
                        a.count = 1
                        a.volume = dv
                        a.pv_lo = pv
                        a.pv_hi = 0
                        a.oi = 0
                        a.flags = ACC_OPEN
                    if has_oi:
                        a.oi = tk.oi
                        a.flags |= ACC_OI
                    a += 1
                # depth: the latest book in place, snapshots at the cadence
                if has_oi:
                    bk = &self._books[s]
                    if ivl > 0 and inst.snap_pending:
                        if t >= inst.snap_end_us:
                            # the interval closed: its last book is final
                            if not inst.snap_stored:
                                self._snaps[nsnap] = bk[0]
                                nsnap += 1
                            inst.snap_pending = 0
                            inst.snap_stored = 0
                        elif inst.snap_stored:
                            # flush() wrote this interval's book so far (a shutdown
                            # mid-interval); a later one of the interval replaces it
                            self._retr[nretr].time_us = bk.time_us
                            self._retr[nretr].instrument_id = inst.instrument_id
                            self._retr[nretr].instrument_token = inst.token
                            nretr += 1
                            inst.snap_stored = 0
                    bk.time_us = t
                    bk.total_bid_quantity = tk.total_buy_quantity
                    bk.total_ask_quantity = tk.total_sell_quantity
                    memcpy(&bk.book, lv, sizeof(levels_t))
                    if ivl == 0:
                        self._snaps[nsnap] = bk[0]
                        nsnap += 1
                    elif not inst.snap_pending:
                        inst.snap_pending = 1
                        inst.snap_end_us = _bucket(t, ivl, shift) + ivl
            self.last_seq = seq
            i = j
        if INGESTOR_DEBUG:
            if (nrows > self._cap_rows or ncand > self._cap_candles or nsnap > self._cap_snaps
                    or nretr > self._cap_snaps):
                abort()
        self.n_tick_rows = nrows
        self.n_candles = ncand
        self.n_snapshots = nsnap
        self.n_retractions = nretr
        self._stats[<int>ST_TICKS] += i - start0
        self._stats[<int>ST_CANDLES] += ncand - ncand0
        self._stats[<int>ST_SNAPSHOTS] += nsnap - nsnap0
        self._stats[<int>ST_REOPENED] += reopened
        return i

    # -- closing buckets ----------------------------------------------------

    cdef int _close(self, int64_t now_us, bint all) noexcept nogil:
        # Write out the candles whose bucket ended by ``now_us`` (all forming
        # ones when ``all``) and the pending snapshots likewise.  Returns 1
        # when done, 0 when a buffer filled first (call again after draining).
        #
        # flush() (``all``) writes a pending book whose interval may still be
        # open: it stays pending, marked stored, so a restart that continues
        # the interval (the engine's state is committed with the batch)
        # replaces that row instead of adding a second one, and one that does
        # not leaves it as the interval's snapshot.
        cdef Py_ssize_t s
        cdef int f
        cdef acc_t *a
        cdef inst_t *inst
        cdef bint ended
        for s in range(self._n_slots):
            inst = &self._inst[s]
            if inst.parked:
                continue
            a = self._acc + s * self._ntf
            for f in range(self._ntf):
                if (a.flags & (ACC_OPEN | ACC_EMITTED)) == ACC_OPEN and (
                        all or a.start_us + self._tf_len[f] <= now_us):
                    if self.n_candles == self._cap_candles:
                        return 0
                    _emit_candle(&self._candles[self.n_candles], a, inst, f)
                    self.n_candles += 1
                    self._stats[<int>ST_CANDLES] += 1
                    a.flags |= ACC_EMITTED | ACC_WRITTEN
                    inst.dirty = 1
                a += 1
            if not inst.snap_pending:
                continue
            ended = not all and inst.snap_end_us <= now_us
            if not (all or ended) or (inst.snap_stored and not ended):
                continue
            if not inst.snap_stored:
                if self.n_snapshots == self._cap_snaps:
                    return 0
                self._snaps[self.n_snapshots] = self._books[s]
                self.n_snapshots += 1
                self._stats[<int>ST_SNAPSHOTS] += 1
            if ended:
                inst.snap_pending = 0
                inst.snap_stored = 0
            else:
                inst.snap_stored = 1
            inst.dirty = 1
        return 1

    def advance(self, int64_t now_us):
        """Close the buckets and snapshot intervals that ended by ``now_us``.

        Their candles and snapshots go to the output buffers.  The forming
        state is kept: a late tick still landing in a written-out bucket
        reopens it and the candle is written again, whole, when it closes
        (upsert it).  Returns True when done, False when a buffer filled
        (drain, ``clear()``, call again).
        """
        cdef int r
        self._enter()
        with nogil:
            r = self._close(now_us, False)
        self._busy = False
        return r == 1

    def flush(self):
        """Write out every forming candle and pending snapshot (at shutdown).

        Returns True when done, False when a buffer filled (drain,
        ``clear()``, call again).
        """
        cdef int r
        self._enter()
        with nogil:
            r = self._close(0, True)
        self._busy = False
        return r == 1

    def open_candles(self):
        """The forming candles not yet written out, as a new ``CANDLE_DTYPE`` array.

        For periodic upserts, so readers see the forming candle; the engine's
        state is unchanged.
        """
        cdef Py_ssize_t s, k = 0, total = 0
        cdef int f
        cdef acc_t *a = self._acc
        for s in range(self._n_slots * self._ntf):
            if (a[s].flags & (ACC_OPEN | ACC_EMITTED)) == ACC_OPEN \
                    and not self._inst[s // self._ntf].parked:
                total += 1
        out = np.zeros(total, dtype=CANDLE_DTYPE)
        cdef candle_t *c = <candle_t *>cnp.PyArray_DATA(out)
        for s in range(self._n_slots):
            for f in range(self._ntf):
                if (a.flags & (ACC_OPEN | ACC_EMITTED)) == ACC_OPEN and not self._inst[s].parked:
                    _emit_candle(&c[k], a, &self._inst[s], f)
                    k += 1
                a += 1
        return out

    # -- output -------------------------------------------------------------

    def output(self):
        """Views of the filled output: ``(tick_rows, candles, snapshots)``.

        Valid until ``clear()`` and the next ``process``/``advance``/``flush``
        overwrite them: encode or copy them first.
        """
        return (self.tick_rows[:self.n_tick_rows], self.candles[:self.n_candles],
                self.snapshots[:self.n_snapshots])

    def clear(self):
        """Empty the output buffers (kept for reuse)."""
        self._enter()
        self.n_tick_rows = 0
        self.n_candles = 0
        self.n_snapshots = 0
        self.n_retractions = 0
        self._busy = False

    def retracted(self):
        """Snapshot rows to delete, a view (``RETRACTION_DTYPE``) valid like ``output()``'s.

        A book ``flush()`` wrote while its interval was still open (a
        shutdown), superseded after a restart by a later book of the same
        interval: one snapshot per interval, as without the restart.  Delete
        these rows (by ``time``, ``instrument_id``) in the batch that writes
        the output.
        """
        return self.retractions[:self.n_retractions]

    cdef int _enter(self) except -1:
        # The loops run without the GIL: another thread calling in meanwhile
        # would race on the slots and buffers.
        if self._busy:
            raise RuntimeError("Engine is in use by another thread")
        self._busy = True
        return 0

    def stats(self):
        """Counters: ticks processed, candles and snapshots written, reopened buckets."""
        return {"ticks": int(self._stats[<int>ST_TICKS]),
                "candles": int(self._stats[<int>ST_CANDLES]),
                "snapshots": int(self._stats[<int>ST_SNAPSHOTS]),
                "reopened": int(self._stats[<int>ST_REOPENED])}

    @property
    def capacities(self):
        """Output buffer sizes: ``(tick_rows, candles, snapshots)``."""
        return (self._cap_rows, self._cap_candles, self._cap_snaps)
