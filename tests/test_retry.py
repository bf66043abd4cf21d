"""The retry loops wait without blocking the event loop.

stamina's ``retry_context`` has two iterators: ``for`` sleeps with ``time.sleep`` (tenacity's
``Retrying``), ``async for`` with ``asyncio.sleep``.  An async function iterating the first
stops everything else on its loop (heartbeats, the broker feed, the spool, leases) for each
backoff.  Each test runs a retry loop against something that is not there while a ticker
task on the same loop notes the time every 10 ms, and checks that the ticker ran inside
the waits between attempts: it never does when the wait is a ``time.sleep``.
"""

import asyncio
import socket
import time

import psycopg
import pytest

from ingestor.config import LogConfig
from ingestor.feed import jetstream
from ingestor.pipeline import log_source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ticked_between_attempts(retry, attempts: list, n: int = 3):
    """Run ``retry`` (a coroutine whose attempts append ``(started, ended)`` to
    ``attempts``) until it made ``n`` attempts, beside a ticker; returns, for each wait
    between two attempts, how many ticks fell inside it.  (Each attempt awaits once: an
    attempt that never yields, retried with ``time.sleep``, would never let the loop cancel
    the retry, and the test would hang instead of failing.)"""
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    tick_task = asyncio.create_task(ticker())
    task = asyncio.create_task(retry)
    try:
        async with asyncio.timeout(60):
            while len(attempts) < n:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        tick_task.cancel()
        await asyncio.gather(task, tick_task, return_exceptions=True)
    waits = [(attempts[k][1], attempts[k + 1][0]) for k in range(n - 1)]
    return [sum(a < t < b for t in ticks) for a, b in waits]


def recorded(fn, attempts: list):
    """``fn`` wrapped to note when each call started and ended."""
    async def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            return await fn(*args, **kwargs)
        finally:
            attempts.append((started, time.monotonic()))
    return wrapper


def test_connect_retrying_lets_the_loop_run_while_it_waits(monkeypatch):
    # the servers refuse (nats-py retries a refused address itself, for ever with the
    # daemon's options: what reaches this loop is an error such as a refused login)
    attempts: list = []

    async def refused(cfg, name):
        await asyncio.sleep(0)
        raise ConnectionRefusedError(f"{cfg.servers[0]}: connection refused")

    monkeypatch.setattr(jetstream, "connect", recorded(refused, attempts))
    cfg = LogConfig(servers=[f"nats://127.0.0.1:{free_port()}"])
    ticks = asyncio.run(ticked_between_attempts(
        jetstream.connect_retrying(cfg, "test", asyncio.Event()), attempts))
    assert all(ticks), ticks


def test_retry_setup_lets_the_loop_run_while_it_waits():
    attempts: list = []

    async def not_ready():
        await asyncio.sleep(0)
        raise TimeoutError("no JetStream yet")

    ticks = asyncio.run(ticked_between_attempts(
        jetstream._retry_setup(recorded(not_ready, attempts), asyncio.Event()), attempts))
    assert all(ticks), ticks


def test_retry_db_lets_the_loop_run_while_it_waits():
    attempts: list = []

    async def away():
        await asyncio.sleep(0)
        raise psycopg.OperationalError("connection refused")

    ticks = asyncio.run(ticked_between_attempts(
        log_source._retry_db(recorded(away, attempts)), attempts))
    assert all(ticks), ticks


@pytest.mark.parametrize("stop_set", [False, True])
def test_retry_setup_gives_up_when_stopped(stop_set):
    # stop set: the next attempt returns None instead of trying
    async def main():
        stop = asyncio.Event()
        calls = []

        async def not_ready():
            calls.append(1)
            if len(calls) == 2:
                stop.set()
            raise TimeoutError("no JetStream yet")

        if stop_set:
            stop.set()
        return await asyncio.wait_for(jetstream._retry_setup(not_ready, stop), 30), calls

    got, calls = asyncio.run(main())
    assert got is None and len(calls) == (0 if stop_set else 2)


def test_retry_setup_is_cancelled_mid_attempt():
    # a cancellation (the daemon stopping) that lands inside an attempt ends the loop: it is
    # not an error of the log, to be retried
    async def main():
        calls = []
        stop = asyncio.Event()

        async def hangs():
            calls.append(1)
            await stop.wait()  # (set only to end a loop that swallowed the cancellation)
            raise TimeoutError("no JetStream yet")

        task = asyncio.create_task(jetstream._retry_setup(hangs, stop))
        async with asyncio.timeout(30):
            while not calls:
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait([task], timeout=10)
        stop.set()
        await task if not task.done() else None
        return task, calls

    task, calls = asyncio.run(main())
    assert task.cancelled() and len(calls) == 1
