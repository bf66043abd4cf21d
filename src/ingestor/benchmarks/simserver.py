"""Simulator server: packets/s it delivers over loopback, and the CPU it spends.

``ingestor simulate --listen`` runs as a subprocess (uvloop, as operators run
it); one client in this process subscribes 2000 tokens in one mode and
counts the packets arriving (from the message headers: no decoding), for
several offered rates.  Delivered vs offered packets/s, and the server's CPU
seconds per wall second over the window (1.0 = one core busy).  The client
shares the machine, so the top rates say as much about it as about the
server.

Run: ``python -m ingestor.benchmarks.simserver [--quick]``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

from ingestor.benchmarks.common import table

TITLE = "simulator server: offered vs delivered packets/s over loopback (one client)"
TOKENS = 2000


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(url: str, tokens: list[int], mode: str, seconds: float, pid: int) -> dict:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
        await ws.send(json.dumps({"a": "mode", "v": [mode, tokens]}))
        t_end = time.perf_counter() + 0.5                      # warm up
        while time.perf_counter() < t_end:
            await ws.recv()
        packets = messages = 0
        cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
        t_end = t0 + seconds
        while time.perf_counter() < t_end:
            m = await ws.recv()
            if isinstance(m, bytes) and len(m) > 1:
                packets += int.from_bytes(m[:2], "big")
                messages += 1
        dt = time.perf_counter() - t0
        cpu = _cpu_seconds(pid) - cpu0
    return {"packets/s": packets / dt, "messages/s": messages / dt, "server cpu": cpu / dt}


def run(quick: bool = False) -> list[dict]:
    rates = [20_000] if quick else [100_000, 300_000, 600_000]
    modes = ["quote"] if quick else ["ltp", "quote", "full"]
    seconds = 0.5 if quick else 3.0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inst = os.path.join(tmp, "instruments.csv")
        for rate in rates:
            for mode in modes:
                p = subprocess.Popen(
                    [sys.executable, "-m", "ingestor", "simulate", "--listen", "127.0.0.1:0",
                     "--tokens", str(TOKENS), "--rate", str(rate), "--instruments-csv", inst],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                try:
                    url = p.stdout.readline().split()[-1] + "/?api_key=bench&access_token=bench"
                    with open(inst) as f:
                        tokens = [int(r[0]) for r in list(csv.reader(f))[1:]]
                    try:
                        import uvloop
                        r = uvloop.run(_measure(url, tokens, mode, seconds, p.pid))
                    except ImportError:
                        r = asyncio.run(_measure(url, tokens, mode, seconds, p.pid))
                finally:
                    p.terminate()
                    p.wait(30)
                rows.append({"mode": mode, "offered/s": float(rate), **r})
    return rows


if __name__ == "__main__":
    print(table(run(quick="--quick" in sys.argv), TITLE))
