# Declarations of the compiled core (``ingestor._core``).
#
# The core is one extension built from several files included by
# ``_core.pyx`` (``core/frames.pyx``: Kite frame decoding; ``core/copy.pyx``:
# binary COPY encoding; later stages add theirs).  This file holds the C record layouts every stage shares and the
# cdef classes, so calls between stages stay C calls.

cimport cython
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "core/endian.h":
    int INGESTOR_DEBUG
    uint16_t ing_load_u16be(const unsigned char *p) noexcept nogil
    uint32_t ing_load_u32be(const unsigned char *p) noexcept nogil
    uint32_t ing_load_u32le(const unsigned char *p) noexcept nogil
    uint64_t ing_load_u64le(const unsigned char *p) noexcept nogil
    uint16_t ing_load_u16le(const unsigned char *p) noexcept nogil
    uint64_t ing_load_u64be(const unsigned char *p) noexcept nogil
    void ing_store_u16be(unsigned char *p, uint16_t v) noexcept nogil
    void ing_store_u32be(unsigned char *p, uint32_t v) noexcept nogil
    void ing_store_u64be(unsigned char *p, uint64_t v) noexcept nogil
    void ing_store_i16be(unsigned char *p, int16_t v) noexcept nogil
    void ing_store_i32be(unsigned char *p, int32_t v) noexcept nogil
    void ing_store_i64be(unsigned char *p, int64_t v) noexcept nogil


# One decoded Kite packet without its depth (96 bytes).  Raw wire integers:
# prices are ``raw / divisor`` exactly; fields a packet's mode does not carry
# are 0.  Mirrored by ``TICK_DTYPE``.
ctypedef struct tick_t:
    int64_t recv_ns             # receive time of the message, ns since the epoch (UTC)
    int64_t seq                 # the message's sequence number in its stream
    uint32_t instrument_token
    uint32_t last_price
    uint32_t last_traded_quantity
    uint32_t average_traded_price
    uint32_t volume_traded
    uint32_t total_buy_quantity
    uint32_t total_sell_quantity
    uint32_t open
    uint32_t high
    uint32_t low
    uint32_t close
    int32_t net_change          # index packets, bytes 24..28: undocumented, kept raw
    uint32_t last_trade_time    # epoch seconds
    uint32_t oi
    uint32_t oi_day_high
    uint32_t oi_day_low
    uint32_t exchange_timestamp # epoch seconds
    uint32_t divisor            # 100, 10_000 or 10_000_000 (segment rule)
    uint16_t length             # packet length: 8, 28, 32, 44 or 184
    uint8_t mode                # MODE_LTP, MODE_QUOTE, MODE_FULL
    uint8_t segment             # instrument_token & 0xff
    int32_t depth_row           # row of this packet's book in the depth buffer, else -1
    uint16_t exchange_ms        # the exchange timestamp's milliseconds (SmartStream's is in
                                # ms: 0..999; Kite's is whole seconds: 0)


# The 5+5 level book of a full packet (100 bytes), struct-of-arrays.
ctypedef struct levels_t:
    uint32_t bid_quantity[5]
    uint32_t bid_price[5]
    uint32_t ask_quantity[5]
    uint32_t ask_price[5]
    uint16_t bid_orders[5]
    uint16_t ask_orders[5]


# A depth record of the pipeline buffers: the book and the tick row it came with.
ctypedef struct depth_t:
    uint32_t tick_row
    levels_t book


# The wide record of ``decode_kite``: tick, the client's ``change``, the book.
ctypedef struct full_t:
    tick_t tick
    double change
    levels_t book


# A text WebSocket message met by the batch path: where it lies in the chunk.
ctypedef struct text_t:
    int64_t seq
    int64_t recv_ns
    int64_t offset
    int64_t length


cdef enum Mode:
    MODE_LTP = 1
    MODE_QUOTE = 2
    MODE_FULL = 3


# Decoder statistics, one counter per event / reason.
cdef enum Counter:
    C_MESSAGES = 0          # binary messages seen (heartbeats included)
    C_HEARTBEATS            # 1-byte binary messages
    C_TEXT_MESSAGES         # text messages seen by the batch path
    C_BYTES                 # binary bytes seen
    C_PACKETS               # packets decoded
    C_LTP
    C_QUOTE
    C_FULL
    C_INDEX_QUOTE
    C_INDEX_FULL
    C_MALFORMED_MESSAGES    # messages with at least one of the errors below
    C_ERR_EMPTY             # a 0-byte binary message: too short for its header
    C_ERR_UNKNOWN_LENGTH    # a packet of a length no mode has (skipped)
    C_ERR_TRUNCATED         # a packet count or length runs past the end of the message
    C_ERR_TRAILING          # bytes left after the last packet
    C_BAD_RECORDS           # capture records of an unknown kind (skipped)
    C_BAD_TIME              # binary capture records received outside the time window (skipped)
    C_NCOUNTERS


cdef class KiteDecoder:
    cdef readonly object ticks
    cdef readonly object depth
    cdef readonly object texts
    cdef tick_t *_ticks
    cdef depth_t *_depth
    cdef text_t *_texts
    cdef Py_ssize_t _cap_ticks
    cdef Py_ssize_t _cap_depth
    cdef Py_ssize_t _cap_texts
    cdef readonly Py_ssize_t n_ticks
    cdef readonly Py_ssize_t n_depth
    cdef readonly Py_ssize_t n_texts
    cdef uint64_t _counters[<int>C_NCOUNTERS]
    cdef public int64_t min_recv_ns
    cdef public int64_t max_recv_ns

    cdef int _ensure(self, Py_ssize_t need_ticks, Py_ssize_t need_depth) except -1
    cdef int _feed(self, const unsigned char *msg, Py_ssize_t n, int64_t recv_ns,
                   int64_t seq) except -1


# ---------------------------------------------------------------------------
# Binary COPY encoding (core/copy.pyx).  Column specs are parsed in Python
# (ingestor.copyspec) into one copy_col_t per output column; the row loop
# only reads these.

# An integer source field of a record.
ctypedef struct copy_src_t:
    Py_ssize_t offset
    uint8_t size                # 1, 2, 4 or 8 bytes
    uint8_t is_signed
    uint8_t big_endian


# A text to send (UTF-8, owned by a bytes object the encoder keeps).
ctypedef struct copy_text_t:
    const char *data
    Py_ssize_t length           # -1: none (a lookup miss is an error)


cdef enum CopyKind:
    CK_INT2 = 1
    CK_INT4
    CK_INT8
    CK_TIMESTAMPTZ
    CK_NUMERIC
    CK_TEXT                     # constant
    CK_TEXT_LOOKUP
    CK_ARR_INT2
    CK_ARR_INT4
    CK_ARR_INT8
    CK_ARR_NUMERIC


cdef enum CopyTsUnit:
    TS_S = 0
    TS_MS
    TS_US
    TS_NS


cdef enum CopyError:
    CE_OK = 0
    CE_INT_RANGE                # value outside the integer target's range
    CE_TS_RANGE                 # outside PostgreSQL's timestamp range
    CE_DIVISOR                  # per-row divisor not a power of ten
    CE_LOOKUP                   # no text for this key


ctypedef struct copy_col_t:
    int kind                    # CopyKind
    uint32_t elem_oid           # arrays: the element type's OID
    copy_src_t src
    Py_ssize_t count            # arrays: elements; 0 for scalars
    int ts_unit                 # CopyTsUnit
    int scale                   # numeric: decimals, -1 when from ``div``
    copy_src_t div              # numeric: the per-row divisor field
    bint null_if_zero
    bint has_unless             # NULL unless (flags & unless_mask)
    copy_src_t unless_src
    uint64_t unless_mask
    bint has_if                 # NULL if (flags & if_mask)
    copy_src_t if_src
    uint64_t if_mask
    copy_text_t *lookup         # dense table of keys lookup_min .. lookup_min + lookup_n - 1
    int64_t lookup_min
    Py_ssize_t lookup_n
    copy_text_t text            # constant text, or the lookup default
    Py_ssize_t max_size         # upper bound of the field on the wire, length word included


# Where and why a row was refused.
ctypedef struct copy_err_t:
    int code                    # CopyError
    Py_ssize_t col
    Py_ssize_t row
    Py_ssize_t elem             # array element, -1 for scalars
    uint64_t mag                # the offending value, as sign + magnitude
    bint neg


cdef class CopyEncoder:
    cdef readonly object dtype
    cdef readonly tuple columns
    cdef readonly tuple plans
    cdef readonly Py_ssize_t max_row_size
    cdef readonly Py_ssize_t rows       # rows in the stream since begin()
    cdef list _keep                     # bytes objects the lookup tables point into
    cdef copy_col_t *_cols
    cdef Py_ssize_t _ncols
    cdef unsigned char *_buf            # the stream buffer
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef int _state                     # 0 idle, 1 begun, 2 ended
    cdef Py_ssize_t _exports            # live buffer views of the stream buffer
    cdef bint _busy                     # a stream call runs without the GIL
    cdef unsigned char *_scratch        # encode()'s reused buffer
    cdef Py_ssize_t _scratch_cap
    cdef bint _scratch_busy             # an encode() is using it (another thread: bypass)

    cdef int _setup(self) except -1
    cdef int _mutable(self) except -1
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _raise(self, copy_err_t *err) except -1
    cdef Py_ssize_t _encode_payload(self, object array, Py_ssize_t start, Py_ssize_t stop,
                                    unsigned char *out) except -1
# Aggregation engine (core/engine.pyx): tick rows, candles, depth snapshots.

cdef extern from "core/wide.h":
    int64_t ing_vwap_e7(uint64_t pv_hi, uint64_t pv_lo, uint64_t volume,
                        uint64_t scale) noexcept nogil


# One ``tick_data`` row (72 bytes), mirrored by ``TICKROW_DTYPE``.  Prices are
# raw (``raw / divisor``); a nullable column is present when its bit is set
# in ``flags`` (ROW_HAS_*), else it is 0 and the database gets NULL.
ctypedef struct tickrow_t:
    int64_t time_us             # receive time, µs, strictly increasing per instrument
    int64_t exchange_time_us    # exchange timestamp in µs (ROW_HAS_EXCHANGE_TIME)
    int64_t seq                 # the message's sequence number in its stream
    int32_t instrument_id
    uint32_t instrument_token
    uint32_t price
    uint32_t quantity           # ROW_HAS_QUANTITY
    uint32_t volume             # cumulative, ROW_HAS_VOLUME
    uint32_t oi                 # ROW_HAS_OI
    uint32_t bid_price          # best level of the book, ROW_HAS_BOOK
    uint32_t bid_quantity
    uint32_t ask_price
    uint32_t ask_quantity
    uint32_t divisor
    uint16_t flags
    uint8_t segment
    uint8_t mode


# One ``ohlc_candles`` row (72 bytes), mirrored by ``CANDLE_DTYPE``.
ctypedef struct candle_t:
    int64_t time_us             # bucket start
    int64_t volume
    int64_t trade_count
    int64_t vwap_e7             # VWAP in units of 1e-7, CANDLE_HAS_VWAP
    int64_t open_interest       # CANDLE_HAS_OI
    int32_t instrument_id
    uint32_t instrument_token
    uint32_t open
    uint32_t high
    uint32_t low
    uint32_t close
    uint32_t divisor
    uint8_t timeframe           # index into Engine.timeframes
    uint8_t flags


# One ``order_book_snapshots`` row, mirrored by ``SNAPSHOT_DTYPE``; also the
# per-instrument latest book kept in place.
ctypedef struct snapshot_t:
    int64_t time_us             # time of the tick that carried the book
    int32_t instrument_id
    uint32_t instrument_token
    uint32_t divisor
    uint32_t total_bid_quantity
    uint32_t total_ask_quantity
    levels_t book


# A forming candle of one instrument and timeframe (64 bytes, one cache line).
ctypedef struct acc_t:
    int64_t start_us
    uint64_t pv_lo              # sum(price_raw * volume increase), 128 bits
    uint64_t pv_hi
    uint64_t volume
    uint32_t open
    uint32_t high
    uint32_t low
    uint32_t close
    uint32_t count
    uint32_t oi
    uint32_t flags              # ACC_* bits
    uint32_t pad


# Per-instrument state of the engine.
ctypedef struct inst_t:
    int64_t last_time_us        # INT64_MIN before the first tick / seed
    int64_t snap_end_us         # end of the pending snapshot's interval
    uint32_t token
    int32_t instrument_id       # -1: not set
    uint32_t last_volume
    uint32_t divisor
    uint8_t has_volume          # last_volume holds a cumulative volume
    uint8_t snap_pending        # books[slot] is the open interval's book, not yet final
    uint8_t snap_stored         # ...and flush() already wrote it (a shutdown mid-interval)
    uint8_t dirty               # changed since the last take_state()
    uint8_t parked              # its ticks go to another engine (a backfill, ``park``): its
                                # forming candles, book and state are neither written nor taken
    uint8_t seen                # met by ``first_unseen`` since the last ``forget_seen``


# The head of an instrument's continuation state (``Engine.take_state``,
# ``STATE_HEAD``): followed in a state record by the timeframe lengths
# (int64 x ntf) and the forming candles (acc_t x ntf).
ctypedef struct statehead_t:
    uint16_t version            # STATE_VERSION
    uint16_t ntf                # timeframes in the record
    uint32_t flags              # STATE_* bits
    int64_t last_time_us
    int32_t instrument_id
    uint32_t token
    uint32_t last_volume
    uint32_t pad
    snapshot_t book             # the latest book (the pending one with STATE_SNAP_PENDING)


# A snapshot row to delete: written by flush() as the interval's book, then
# superseded by a later book of the same interval (a restart mid-interval).
ctypedef struct retraction_t:
    int64_t time_us
    int32_t instrument_id
    uint32_t instrument_token


@cython.final
cdef class Engine:
    cdef readonly tuple timeframes
    cdef readonly int64_t utc_offset_us
    cdef readonly int64_t origin_us
    cdef readonly int64_t snapshot_interval_us
    cdef int64_t _shift
    cdef int _ntf
    cdef int64_t *_tf_len
    # instrument slots and the token -> slot hash table
    cdef inst_t *_inst
    cdef acc_t *_acc
    cdef readonly object books
    cdef snapshot_t *_books
    cdef Py_ssize_t _n_slots
    cdef Py_ssize_t _cap_slots
    cdef uint32_t *_hkeys
    cdef int32_t *_hvals
    cdef Py_ssize_t _hmask
    cdef int32_t *_scratch
    cdef Py_ssize_t _cap_scratch
    # outputs
    cdef readonly object tick_rows
    cdef readonly object candles
    cdef readonly object snapshots
    cdef readonly object retractions
    cdef readonly object state_dtype
    cdef retraction_t *_retr
    cdef tickrow_t *_rows
    cdef candle_t *_candles
    cdef snapshot_t *_snaps
    cdef Py_ssize_t _cap_rows
    cdef Py_ssize_t _cap_candles
    cdef Py_ssize_t _cap_snaps
    cdef readonly Py_ssize_t n_tick_rows
    cdef readonly Py_ssize_t n_candles
    cdef readonly Py_ssize_t n_snapshots
    cdef readonly Py_ssize_t n_retractions
    cdef readonly int64_t last_seq
    cdef uint64_t _stats[4]
    cdef bint _busy                     # a loop runs without the GIL (another thread: refuse)

    cdef Py_ssize_t _slot(self, uint32_t token) noexcept nogil
    cdef Py_ssize_t _new_slot(self, uint32_t token) except -1
    cdef int _grow_outputs(self, Py_ssize_t rows, Py_ssize_t candles,
                           Py_ssize_t snaps) except -1
    cdef int _resolve(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                      Py_ssize_t n_depth) except -1
    cdef int _enter(self) except -1
    cdef Py_ssize_t _run(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                         const depth_t *depth) except -1
    cdef Py_ssize_t _run_nogil(self, const tick_t *ticks, Py_ssize_t start, Py_ssize_t n,
                               const depth_t *depth, Py_ssize_t base,
                               Py_ssize_t *need) noexcept nogil
    cdef int _close(self, int64_t now_us, bint all) noexcept nogil


# ---------------------------------------------------------------------------
# Angel One SmartAPI WebSocket 2.0 ("SmartStream") decoding (core/smartstream.pyx).
#
# A SmartStream packet becomes the same tick_t (and depth_t for SNAP_QUOTE's 5+5 book) the
# Kite decoder fills, so the engine, the COPY encoders and the writer are shared.  In those
# records ``length`` is the Kite length whose fields the packet carries (LTP 8, QUOTE 44,
# SNAP_QUOTE 184: the engine reads quantity, OI and the book by it), ``mode`` is
# MODE_LTP/QUOTE/FULL, and ``instrument_token`` is the engine key of (exchange type,
# token): its low byte is the segment code of the Kite table (price divisor and exchange
# name), the rest is assigned by the registry (see ``SmartStreamDecoder``).

# The 20+20 level book of a DEPTH (mode 4) packet: no price, so no tick row.
ctypedef struct depth20_t:
    int64_t recv_ns
    int64_t seq
    int64_t word27              # bytes 27..35: A2's exchange timestamp, A1's sequence number
    int64_t word35              # bytes 35..43: A1's exchange timestamp, A2's receive time
    uint32_t instrument_token   # the engine key
    uint32_t divisor
    uint32_t bid_quantity[20]
    uint32_t bid_price[20]
    uint32_t ask_quantity[20]
    uint32_t ask_price[20]
    uint16_t bid_orders[20]
    uint16_t ask_orders[20]
    uint8_t segment
    uint8_t exchange_type
    uint8_t pad[6]


# One slot of the (exchange type, token) -> engine key table: open addressing.
ctypedef struct ss_slot_t:
    unsigned char key[28]       # exchange type, then the token NUL-padded to 25 bytes, 2 zeros
    uint32_t value              # the engine key; 0: refused (not an instrument)
    uint32_t used


cdef enum SSCounter:
    SS_MESSAGES = 0         # binary messages seen
    SS_TEXT_MESSAGES        # text messages seen by the batch path (pong, JSON errors)
    SS_BYTES
    SS_PACKETS              # packets decoded (tick rows plus depth20 rows)
    SS_LTP
    SS_QUOTE
    SS_SNAP_QUOTE
    SS_DEPTH
    SS_MALFORMED            # messages set aside (or kept with trailing bytes) for a reason below
    SS_EMPTY                # a 0-byte binary message
    SS_UNKNOWN_MODE         # byte 0 is not 1..4
    SS_SHORT                # shorter than its mode's packet
    SS_TRAILING             # longer than its mode's packet (decoded, the rest ignored)
    SS_UNKNOWN_EXCHANGE     # byte 1 is no exchange type of the documentation
    SS_BAD_TOKEN            # empty, or not printable ASCII up to its NUL
    SS_OUT_OF_RANGE         # a price, quantity or depth level outside 0..2^32-1
    SS_REFUSED_TOKEN        # the registry refused the token (no engine key)
    SS_BAD_FIELD            # an informational field unrepresentable, stored as 0 (kept)
    SS_BAD_RECORDS
    SS_BAD_TIME
    SS_NCOUNTERS


cdef class SmartStreamDecoder(KiteDecoder):
    cdef readonly object depth20
    cdef depth20_t *_depth20
    cdef Py_ssize_t _cap_depth20
    cdef readonly Py_ssize_t n_depth20
    cdef uint64_t _ss[<int>SS_NCOUNTERS]
    cdef ss_slot_t *_table
    cdef Py_ssize_t _tmask
    cdef Py_ssize_t _tcount
    cdef uint32_t _next_local
    cdef unsigned char _miss[28]        # the key of the last lookup that missed
    cdef public object resolver
    cdef dict _tokens                   # engine key -> (exchange type, token)

    cdef int _ensure20(self, Py_ssize_t need) except -1
    cdef int _grow_table(self) except -1
    cdef int _insert(self, const unsigned char *key, uint32_t value) except -1
    cdef int _resolve_miss(self) except -1
