"""The decoder walks captures without the GIL: another thread runs meanwhile.

``KiteDecoder.feed_capture`` releases the GIL around its C walk (and ``feed`` for large
messages), so a pipeline thread decoding and the event loop can use both cores.  The
check is deterministic, not a timing race: with the switch interval raised to minutes,
the only way another thread can take the GIL while the main thread is inside
``feed_capture`` is that the call gave it up.
"""

from __future__ import annotations

import struct
import sys
import threading
import time

from ingestor import KiteDecoder
from ingestor.sim.market import Market


def _record(payload: bytes, recv_ns: int = 1, kind: int = 1) -> bytes:
    return struct.pack("<QBI", recv_ns, kind, len(payload)) + payload


def _ran_inside(call) -> bool:
    """Whether another thread ran Python while ``call()`` was running in this one."""
    state = {"inside": False, "seen": None}
    go = threading.Event()

    def other():
        go.wait()
        # Here only when this thread holds the GIL: the main thread gave it up.
        state["seen"] = state["inside"]

    th = threading.Thread(target=other)
    th.start()
    state["inside"] = True
    go.set()                      # the other thread wakes and asks for the GIL ...
    call()                        # ... which it gets during the call only if released
    state["inside"] = False
    th.join()
    return bool(state["seen"])


def test_feed_capture_releases_the_gil():
    market = Market(n_tokens=100, seed=3)
    msg = market.message({int(t): "full" for t in market.tokens})
    chunk = b"".join(_record(msg, recv_ns=i) for i in range(400))   # 40,000 full packets
    books = 400 * int((~market.is_index).sum())                      # index packets have none
    dec = KiteDecoder(capacity=40_000, depth_capacity=books)
    # The other thread needs a core to run on; on a busy machine it may wake after a walk
    # has ended, so a few walks are allowed (each well over a millisecond).
    old = sys.getswitchinterval()
    sys.setswitchinterval(300.0)  # no forced hand-over: the GIL moves only when released
    try:
        deadline = time.monotonic() + 20
        released = False
        while not released and time.monotonic() < deadline:
            dec.clear()
            released = _ran_inside(lambda: dec.feed_capture(chunk))
            assert dec.n_ticks == 40_000 and dec.n_depth == books
    finally:
        sys.setswitchinterval(old)
    assert released, "no other thread ran while feed_capture walked 400 records"


def test_a_large_message_grows_the_buffers_without_the_gil_and_decodes_the_same():
    # The walk stops for a record larger than the empty buffers, grows them with the GIL
    # and goes on: the same rows as one feed per message.
    market = Market(n_tokens=300, seed=4)
    big = market.message({int(t): "full" for t in market.tokens})        # 300 packets
    small = market.message({int(t): "ltp" for t in market.tokens}, 5)
    chunk = _record(small, 1) + _record(big, 2) + _record(small, 3)
    dec = KiteDecoder(capacity=8, depth_capacity=2)
    pos, seq, full = dec.feed_capture(chunk)
    assert (pos, seq, full) == (len(_record(small)), 1, True)        # no room after the first
    dec.clear()
    pos, seq, full = dec.feed_capture(chunk, pos, seq)
    assert (pos, seq, full) == (len(chunk) - len(_record(small)), 2, True)   # grown for big
    books = int((~market.is_index).sum())
    assert dec.n_ticks == 300 and dec.n_depth == books and dec.capacity >= 300
    ref = KiteDecoder(capacity=1000, depth_capacity=1000)
    assert ref.feed(big, 2, 1)
    assert ref.n_ticks == 300 and ref.n_depth == books
    assert dec.ticks[:300].tobytes() == ref.ticks[:300].tobytes()
    assert dec.depth[:books].tobytes() == ref.depth[:books].tobytes()
