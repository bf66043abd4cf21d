# Tick rows grouped by instrument for the columnstore (included by _core.pyx).
#
# TimescaleDB's direct-to-columnstore COPY compresses rows as they arrive: it cuts a
# compressed batch whenever the segmentby value (instrument_id) changes or 1000 rows are
# in it, and with ``timescaledb.enable_direct_compress_copy_client_sorted`` it takes each
# batch as already ordered by the table's ``orderby``.  So one flush's rows must reach the
# server grouped by instrument, each group in the declared direction.  The engine emits
# them in arrival order (instruments interleaved, each instrument's times strictly
# increasing), so a stable counting sort by instrument does it in two passes over the rows,
# O(rows + instruments), without the GIL: the first pass numbers each row's instrument
# (an open-addressing table keyed by instrument_id), the second places the rows.
#
# Instruments with at least ``min_rows`` rows in the flush come first (the dense part: big
# enough to make good compressed batches), the others after them (the sparse part, for the
# rowstore: the columnstore's small-batch trap).  The writer sends the two parts as two
# COPYs; ``group_ticks`` returns where the first ends.

cdef enum:
    GROUP_EMPTY = -1


cdef inline Py_ssize_t _group_of(int32_t key, int64_t *keys, int32_t *vals, Py_ssize_t mask,
                                 Py_ssize_t *ngroups) noexcept nogil:
    # ``key``'s group in the open-addressing table; a key met for the first time gets the
    # next number (``ngroups`` counts them)
    cdef Py_ssize_t h = <Py_ssize_t>((<uint32_t>key * <uint32_t>2654435761u) & <uint32_t>mask)
    while keys[h] != GROUP_EMPTY and keys[h] != key:
        h = (h + 1) & mask
    if keys[h] == GROUP_EMPTY:
        keys[h] = key
        vals[h] = <int32_t>ngroups[0]
        ngroups[0] += 1
    return vals[h]


cdef Py_ssize_t _group_ticks(const tickrow_t *rows, tickrow_t *out, Py_ssize_t n,
                             Py_ssize_t min_rows, bint descending, int32_t *row_group,
                             int64_t *keys, int32_t *vals, Py_ssize_t mask,
                             Py_ssize_t *count, Py_ssize_t *cursor) noexcept nogil:
    cdef Py_ssize_t r, g, known, ngroups = 0, pos = 0, dense, part
    for r in range(n):
        known = ngroups
        g = _group_of(rows[r].instrument_id, keys, vals, mask, &ngroups)
        if ngroups != known:  # a new group
            count[g] = 0
        count[g] += 1
        row_group[r] = <int32_t>g
    # each group's first slot: dense groups first, then sparse ones, each part in order of
    # first appearance; ``descending`` fills a group from its last slot backwards
    dense = 0
    for part in range(2):
        for g in range(ngroups):
            if (count[g] >= min_rows) == (part == 0):
                cursor[g] = pos + count[g] - 1 if descending else pos
                pos += count[g]
        if part == 0:
            dense = pos
    for r in range(n):
        g = row_group[r]
        out[cursor[g]] = rows[r]
        if descending:
            cursor[g] -= 1
        else:
            cursor[g] += 1
    return dense


def group_ticks(rows, out, Py_ssize_t min_rows=1, bint descending=True):
    """Copy tick rows into ``out`` grouped by instrument, dense instruments first.

    Parameters
    ----------
    rows : ndarray of TICKROW_DTYPE
        One flush's rows as the engine emitted them (each instrument's rows in time order).
    out : ndarray of TICKROW_DTYPE
        At least ``len(rows)`` rows; ``out[:len(rows)]`` is overwritten.
    min_rows : int
        Instruments with at least this many rows come first (the dense part).
    descending : bool
        Each instrument's rows newest first (the columnstore's ``orderby time DESC``);
        False keeps them oldest first.

    Returns
    -------
    int
        The dense part's rows: ``out[:k]`` holds the instruments with ``min_rows`` rows or
        more, ``out[k:len(rows)]`` the others.  Stable: instruments appear in the order of
        their first row, and a group's rows keep (or exactly reverse) their order.
    """
    cdef cnp.ndarray src = rows
    cdef cnp.ndarray dst = out
    if src.dtype != TICKROW_DTYPE or dst.dtype != TICKROW_DTYPE:
        raise TypeError("group_ticks: rows and out must be TICKROW_DTYPE arrays")
    if src.ndim != 1 or dst.ndim != 1 or not src.flags.c_contiguous \
            or not dst.flags.c_contiguous:
        raise ValueError("group_ticks: rows and out must be one-dimensional and contiguous")
    if not dst.flags.writeable:
        raise ValueError("group_ticks: out is read-only")
    cdef Py_ssize_t n = src.shape[0]
    if dst.shape[0] < n:
        raise ValueError(f"group_ticks: out holds {dst.shape[0]} rows, {n} needed")
    if n == 0:
        return 0
    if np.may_share_memory(src, dst):
        raise ValueError("group_ticks: rows and out overlap")
    cdef Py_ssize_t cap = 64, dense
    while cap < 2 * n:
        cap <<= 1
    cdef int32_t *row_group = <int32_t *>malloc(n * sizeof(int32_t))
    cdef int64_t *keys = <int64_t *>malloc(cap * sizeof(int64_t))
    cdef int32_t *vals = <int32_t *>malloc(cap * sizeof(int32_t))
    cdef Py_ssize_t *count = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t *cursor = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t i
    try:
        if row_group == NULL or keys == NULL or vals == NULL or count == NULL or cursor == NULL:
            raise MemoryError()
        with nogil:
            for i in range(cap):
                keys[i] = GROUP_EMPTY
            dense = _group_ticks(<const tickrow_t *>cnp.PyArray_DATA(src),
                                 <tickrow_t *>cnp.PyArray_DATA(dst), n, max(min_rows, 1),
                                 descending, row_group, keys, vals, cap - 1, count, cursor)
    finally:
        free(row_group)
        free(keys)
        free(vals)
        free(count)
        free(cursor)
    return dense


def last_rows(rows):
    """The index of each instrument's last row in ``rows`` (TICKROW_DTYPE, as the engine
    emitted them), instruments in the order of their first row: one pass over the rows with
    the same open-addressing table as ``group_ticks``, no sort (a drain's latest price of
    every instrument, for marking positions to market, without ``numpy.unique``).

    Returns
    -------
    ndarray of int64
        One index per instrument.
    """
    cdef cnp.ndarray src = rows
    if src.dtype != TICKROW_DTYPE:
        raise TypeError("last_rows: rows must be a TICKROW_DTYPE array")
    if src.ndim != 1 or not src.flags.c_contiguous:
        raise ValueError("last_rows: rows must be one-dimensional and contiguous")
    cdef Py_ssize_t n = src.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    cdef int64_t[::1] ov = out
    cdef const tickrow_t *rs = <const tickrow_t *>cnp.PyArray_DATA(src)
    cdef Py_ssize_t cap = 64, mask, r, i, ngroups = 0
    while cap < 2 * n:
        cap <<= 1
    mask = cap - 1
    cdef int64_t *keys = <int64_t *>malloc(cap * sizeof(int64_t))
    cdef int32_t *vals = <int32_t *>malloc(cap * sizeof(int32_t))
    try:
        if keys == NULL or vals == NULL:
            raise MemoryError()
        with nogil:
            for i in range(cap):
                keys[i] = GROUP_EMPTY
            for r in range(n):
                ov[_group_of(rs[r].instrument_id, keys, vals, mask, &ngroups)] = r
    finally:
        free(keys)
        free(vals)
    return out[:ngroups]
