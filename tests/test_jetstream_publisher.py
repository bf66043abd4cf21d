"""The feed's publisher against a real ``nats-server`` whose ``max_payload`` is small: a
spool chunk goes out as few messages as the limit allows, each within it, in order; a
record larger than the limit is set aside and counted, the rest flows; and a leftover of a
killed feed, read back from its spool in chunks that end inside the first run's messages,
goes out again in the same messages, which JetStream's duplicate window drops."""

from __future__ import annotations

import asyncio

import pytest

from ingestor.config import LogConfig
from ingestor.feed.capture import KIND_BINARY, KIND_TEXT, iter_records
from ingestor.feed.jetstream import Publisher, decode_records, ensure_stream, subject_of
from ingestor.feed.spool import Spool, StreamSpool
from jetstream_harness import NATS_SERVER, NatsServer, _log_messages

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")

MAX_PAYLOAD = 64 << 10
STREAM = "kite-0-00000000beef"
SUBJECT = subject_of("ingestor", "kite-0")


def _payloads() -> list[bytes]:
    small = [bytes([k % 251]) * (2_000 + 37 * k) for k in range(60)]
    # one record larger than the server takes, in the middle
    return small[:30] + [b"\xee" * (MAX_PAYLOAD + 1)] + small[30:]


async def _publish(pub: Publisher, sp, chunks) -> None:
    acker = asyncio.get_running_loop().create_task(pub.acks())
    try:
        for chunk, first in chunks:
            await pub.publish_chunk(sp, chunk, first)
        await pub.flush_carried(sp)
        await pub.drain()
    finally:
        acker.cancel()


async def _scenario(url: str, folder: str) -> None:
    import nats

    cfg = LogConfig(servers=[url], stream="TEST", duplicate_window=120.0)
    nc = await nats.connect(url)
    try:
        assert nc.max_payload == MAX_PAYLOAD
        js = nc.jetstream(publish_async_max_pending=2 * cfg.max_in_flight + 16)
        await ensure_stream(js, cfg)

        # a live stream: appended, written out by the spool's thread (here: by the test,
        # before the log acknowledges anything, so the records are on disk), published
        spool = Spool(folder, max_bytes=1 << 30)
        sp = StreamSpool(spool, STREAM)
        spool.streams.append(sp)
        payloads = _payloads()
        live = []  # taken as a live feed's are: whatever arrived since the last take
        for k, p in enumerate(payloads):
            sp.append(p, KIND_TEXT if k % 7 == 0 else KIND_BINARY, 1_000 + k)
            if k % 9 == 8:
                live.append(sp.take())
        live.append(sp.take())
        sp._write_out()
        pub = Publisher(js, SUBJECT, cfg, "kite-0", None, max_payload=nc.max_payload)
        await _publish(pub, sp, live)
        assert pub.oversized == 1
        assert sp.committed == len(payloads) - 1  # released through, the set-aside one too
        sp._write_out()  # the message ends go beside the segment; then the feed is killed

        msgs = await _log_messages(url)
        # cut where each take ended and by the limit, not one per record
        assert len(live) <= len(msgs) == pub.messages < len(payloads) - 1
        seen = []
        for m in msgs:
            assert len(m.data) <= MAX_PAYLOAD
            stream, first, n, _, records = decode_records(m.headers, m.data)
            assert stream == STREAM
            got = [(records[o:o + ln], kind, ns) for o, ln, ns, kind in iter_records(records)]
            assert len(got) == n
            for j, (data, kind, ns) in enumerate(got):
                seq = first + j
                seen.append(seq)
                assert (data, ns) == (payloads[seq], 1_000 + seq)
                assert kind == (KIND_TEXT if seq % 7 == 0 else KIND_BINARY)
        assert seen == [k for k in range(len(payloads)) if k != 30]  # in order, once each

        # the restart: the leftover read back in small chunks, which end inside the first
        # run's messages; the same messages go out again and are all dropped as duplicates
        again = Spool(folder, max_bytes=1 << 30)
        (left,) = again.leftovers()
        assert left.batch_ends
        chunks = []
        while (got := left.take(limit=10_000)) is not None:
            chunks.append(got)
        assert len(chunks) > len(msgs)
        pub2 = Publisher(js, SUBJECT, cfg, "kite-0", None, max_payload=nc.max_payload)
        await _publish(pub2, left, chunks)
        assert pub2.duplicates == len(payloads) - 1  # every record the log had
        assert pub2.oversized == 1
        assert len(await _log_messages(url)) == len(msgs)  # the log did not grow
        again.close()
    finally:
        await nc.close()


def test_publisher_cuts_messages_sets_aside_and_republishes_the_same_ids(tmp_path):
    server = NatsServer(tmp_path, config=f"max_payload: {MAX_PAYLOAD}\n")
    try:
        asyncio.run(_scenario(server.url, str(tmp_path / "spool")))
    finally:
        server.stop()
