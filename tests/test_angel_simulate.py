"""``ingestor simulate --broker angel``: an offline SmartStream capture and the live server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from ingestor._core import SmartStreamDecoder
from ingestor.feed.capture import CaptureReader
from ingestor.feed.smartstream import SmartStreamFeed
from ingestor.store.instruments import read_angel


def test_offline_capture_decodes_whole(tmp_path):
    cap, master = tmp_path / "a.cap", tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "ingestor", "simulate", "--broker", "angel",
                        "--out", str(cap), "--ticks", "3000", "--tokens", "40",
                        "--scrip-master", str(master)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    reader = CaptureReader(cap)
    assert reader.header.broker == "angel"
    dec = SmartStreamDecoder(1 << 13)
    for chunk, seq in reader.chunks():
        pos, _, full = dec.feed_capture(chunk, 0, seq)
        assert not full and pos == len(chunk)
    reader.close()
    s = dec.stats()
    assert s["packets"] == s["messages"] == 3000 and s["malformed_messages"] == 0
    assert min(s["ltp"], s["quote"], s["snap_quote"], s["depth"]) > 0
    keys = {(r.exchange_type, r.token) for r in read_angel(master).rows}
    assert set(dec.keys().values()) <= keys


def test_listen_serves_the_client(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ingestor", "simulate", "--broker", "angel",
                             "--listen", "127.0.0.1:0", "--duration", "30", "--tokens", "20",
                             "--expected-token", "ft", "--record", str(tmp_path / "r.cap")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on ws://"), line + proc.stderr.read()
        url = line.split()[-1]

        async def main():
            got = []
            feed = SmartStreamFeed("angel-0", url, "k", "C1", "jwt", "ft",
                                   {(1, "1"): "ltp"} | {(e, t): "quote" for e, t in
                                                       [(2, str(n)) for n in range(1, 3)]},
                                   on_message=lambda *a: got.append(a))
            stop = asyncio.Event()
            task = asyncio.create_task(feed.run(stop))
            deadline = time.monotonic() + 20
            while feed.stats.connects == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stop.set()
            await feed.close()
            await asyncio.wait_for(task, 5)
            return feed

        feed = asyncio.run(main())
        assert feed.stats.connects == 1 and feed.stats.rejected == 0
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "served" in out and "connection(s)" in out
