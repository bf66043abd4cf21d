"""Helpers for the daemon's end-to-end tests: a simulator process, a daemon process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal

import psycopg

from ingestor._core import KiteDecoder
from ingestor.pipeline.batch import decode_capture


def ingestor(*args: str) -> list[str]:
    return [sys.executable, "-m", "ingestor", *args]


class Simulator:
    def __init__(self, tmp, *extra: str, tokens: int = 40, rate: int = 4000, seed: int = 3,
                 duration: float = 120):
        self.record = str(tmp / "sim.cap")
        self.csv = str(tmp / "instruments.csv")
        self.proc = subprocess.Popen(
            ingestor("simulate", "--listen", "127.0.0.1:0", "--tokens", str(tokens), "--rate",
                     str(rate), "--duration", str(duration), "--seed", str(seed), "--record",
                     self.record, "--instruments-csv", self.csv, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "ws://" in line, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = line[line.index("ws://"):].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sent_packets(self) -> int:
        dec = KiteDecoder()
        for _ in decode_capture(self.record, dec):
            pass
        return dec.stats()["packets"]


class AngelSimulator:
    """``ingestor simulate --broker angel --listen``: the SmartStream simulator process, with its
    instrument master and its recording of every packet sent."""

    def __init__(self, tmp, *extra: str, tokens: int = 30, rate: int = 3000, seed: int = 5,
                 duration: float = 120, name: str = "angel"):
        self.record = str(tmp / f"{name}-sim.cap")
        self.master = str(tmp / f"{name}-OpenAPIScripMaster.json")
        self.proc = subprocess.Popen(
            ingestor("simulate", "--broker", "angel", "--listen", "127.0.0.1:0", "--tokens",
                     str(tokens), "--rate", str(rate), "--duration", str(duration), "--seed",
                     str(seed), "--record", self.record, "--scrip-master", self.master, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "ws://" in line, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = line[line.index("ws://"):].split()[0]

    stop = Simulator.stop

    def sent(self) -> list[bytes]:
        """Every packet the simulator sent, in order (complete once it has stopped)."""
        from ingestor.feed.capture import KIND_BINARY, CaptureReader

        with CaptureReader(self.record) as rd:
            return [bytes(r.payload) for r in rd.records() if r.kind == KIND_BINARY]


def angel_feed_toml(url: str, *, name: str = "angel", env_prefix: str = "ANGEL",
                    extra: str = "", credentials_file=None, rejected_retry: float = 30.0) -> str:
    """An Angel One ``[[feeds]]`` table reading its four credentials from ``<prefix>_*``, or
    from ``credentials_file``."""
    creds = (f'credentials_file = "{credentials_file}"\n' if credentials_file else
             f"api_key_env = \"{env_prefix}_API_KEY\"\nclient_code_env = \"{env_prefix}_CLIENT_CODE\"\n"
             f"access_token_env = \"{env_prefix}_JWT\"\nfeed_token_env = \"{env_prefix}_FEED_TOKEN\"\n")
    return (f"[[feeds]]\nname = \"{name}\"\nbroker = \"angel\"\nurl = \"{url}\"\n{creds}"
            "heartbeat_timeout = 5.0\nreconnect_min = 0.1\nreconnect_max = 0.5\n"
            f"rejected_retry = {rejected_retry}\nping_interval = 1.0\n{extra}")


def angel_modes_toml(tokens: int, seed: int) -> str:
    """The ``mode``/``modes`` of an Angel feed on ``AngelSimulator(tokens=, seed=)``: every
    instrument in SNAP_QUOTE (``full``), a few nse_cm ones in DEPTH, some in LTP and QUOTE:
    every packet layout through the daemon."""
    from ingestor.sim.smartstream import AngelMarket

    keys = list(AngelMarket(tokens, seed).keys)
    nse = [k for k in keys if k[0] == 1]
    other = [k for k in keys if k not in nse[:2]]
    modes = {**{k: "depth" for k in nse[:2]}, **{k: "ltp" for k in other[:4]},
             **{k: "quote" for k in other[4:8]}}
    body = ", ".join(f'"{e}:{t}" = "{m}"' for (e, t), m in modes.items())
    return f'mode = "full"\nmodes = {{ {body} }}\n'


def load_angel_master(dsn: str, master: str) -> None:
    """``ingestor instruments load`` of an Angel One instrument master."""
    subprocess.run(ingestor("instruments", "load", master, "--dsn", dsn), check=True,
                   capture_output=True)


def _ms(ms: int):
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc) if ms > 0 else None


def angel_sent_ticks(packets: list[bytes], dsn: str) -> tuple[Counter, int]:
    """(instrument id, exact price, exchange time to the millisecond) of every SmartStream tick
    packet sent, and the number of DEPTH ones (which make no tick)."""
    from ingestor.twin.smartstream import parse_packet

    with psycopg.connect(dsn) as conn:
        id_of = {(int(e), t): i for e, t, i in conn.execute(
            "SELECT exchange_type, broker_token, id FROM instruments WHERE broker = 'angel'")}
    want: Counter = Counter()
    depth = 0
    for p in packets:
        d = parse_packet(p)
        if d["subscription_mode"] == 4:
            depth += 1
            continue
        div = 10**7 if d["exchange_type"] == 13 else 100
        want[(id_of[d["exchange_type"], d["token"]], Decimal(d["last_traded_price"]) / div,
              _ms(d["exchange_timestamp"]))] += 1
    return want, depth


def angel_all_written(sim, dsn: str, timeout: float) -> tuple[Counter, int]:
    """``angel_sent_ticks`` of a stopped simulator's packets, once ``tick_data`` holds as
    many ticks as it sent."""
    want, n_depth = angel_sent_ticks(sim.sent(), dsn)
    sent = sum(want.values())
    wait_for(lambda: count_ticks(dsn) >= sent, timeout=timeout,
             what=f"all {sent} sent ticks written")
    return want, n_depth


def angel_stored_ticks(dsn: str) -> Counter:
    """``angel_sent_ticks``'s tuples of the Angel One ticks in ``tick_data``."""
    with psycopg.connect(dsn) as conn:
        return Counter((i, p, et) for i, p, et in conn.execute(
            "SELECT t.instrument_id, t.price, t.exchange_time FROM tick_data t JOIN instruments i "
            "ON i.id = t.instrument_id WHERE i.broker = 'angel'"))


#: the credentials ``angel_feed_toml`` reads (secrets that must never reach a log)
ANGEL_ENV = {"ANGEL_API_KEY": "angel-api-key", "ANGEL_CLIENT_CODE": "A123456",
             "ANGEL_JWT": "angel-jwt-secret", "ANGEL_FEED_TOKEN": "angel-feed-secret"}


class Daemon:
    def __init__(self, tmp, dsn: str, url: str | None, *, config: str = "", feed: str = "",
                 name: str = "daemon", metrics_port: int | None = None, writer: str = "",
                 feeds: str | None = None, env: dict | None = None):
        """``feeds``: ``[[feeds]]`` tables in place of the single Kite ``[feed]`` (then ``url``
        is not passed); ``env``: more environment variables (credentials)."""
        self.cfg = tmp / f"{name}.toml"
        head = feeds if feeds is not None else (
            f"[feed]\n{feed}mode = \"full\"\nheartbeat_timeout = 2.0\nreconnect_min = 0.1\n"
            "reconnect_max = 0.5\nrejected_retry = 30.0\n")
        self.cfg.write_text(
            head
            + "[pipeline]\nflush_interval = 0.2\nflush_rows = 5000\n"
            f"[spool]\ndir = \"{tmp / 'spool'}\"\n"
            f"[writer]\ndead_letter_dir = \"{tmp / 'dead'}\"\n{writer}"
            f"[metrics]\nlisten = \"{f'127.0.0.1:{metrics_port}' if metrics_port else ''}\"\n"
            + config)
        self.log = open(tmp / f"{name}.log", "w")
        env = dict(os.environ, KITE_API_KEY="test-key", KITE_ACCESS_TOKEN="test-token-secret",
                   **(env or {}))
        url_flag = ["--url", url] if feeds is None else []
        self.proc = subprocess.Popen(ingestor("run", "--config", str(self.cfg), "--dsn", dsn,
                                              *url_flag), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        self.logpath = tmp / f"{name}.log"

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def output(self) -> str:
        return self.logpath.read_text()


def load_instruments(dsn: str, csv: str) -> None:
    subprocess.run(ingestor("instruments", "load", csv, "--dsn", dsn), check=True,
                   capture_output=True)


def wait_for(cond, timeout: float = 30, step: float = 0.1, what: str = ""):
    """Poll ``cond`` until it returns something true (returned) or ``timeout`` s pass.

    The deadline is generous (the machine may be busy): a test waits for the state it checks,
    never for a fixed time.  The failure names ``what`` and the last value seen.
    """
    end = time.monotonic() + timeout
    v = None
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= end:
            raise AssertionError(f"condition not met in {timeout} s: {what or cond} (last: {v!r})")
        time.sleep(step)


def capture_files(*dirs) -> list[str]:
    """The capture files under ``dirs``, in receive order: streams by their first record's
    receive time, each stream's segments by sequence number (read from the files alone,
    whatever the daemon's own spool code does)."""
    import glob

    from ingestor.feed.capture import CaptureReader

    info = []
    for path in (p for d in dirs for p in glob.glob(os.path.join(str(d), "*.cap"))):
        with CaptureReader(path) as rd:
            first = next(iter(rd.records()), None)
            info.append((rd.header.stream, rd.header.first_seq,
                         first.recv_ns if first else 0, path))
    start: dict[str, int] = {}
    for stream, _, recv_ns, _ in sorted(info):
        start.setdefault(stream, recv_ns)
    return [path for stream, seq, _, path in sorted(info, key=lambda x: (start[x[0]], x[0], x[1]))]


def captured_packets(*dirs) -> int:
    """Tick packets in the capture files under ``dirs`` (a daemon's recording and spool)."""
    total = 0
    for path in capture_files(*dirs):
        dec = KiteDecoder()
        for _ in decode_capture(path, dec):
            pass
        total += dec.stats()["packets"]
    return total


def captured_texts(*paths_or_dirs) -> list[bytes]:
    """The text messages (postbacks) of capture files, or of the files under directories,
    in receive order."""
    from ingestor.feed.capture import KIND_TEXT, CaptureReader

    paths = []
    for p in map(str, paths_or_dirs):
        paths.extend(capture_files(p) if os.path.isdir(p) else [p])
    out = []
    for path in paths:
        with CaptureReader(path) as rd:
            out.extend(rec.payload for rec in rd.records() if rec.kind == KIND_TEXT)
    return out


def count_ticks(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("select count(*) from tick_data").fetchone()[0]


def tick_summary(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as c:
        return c.execute("select count(*), count(distinct (instrument_id, time)) from tick_data").fetchone()


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a daemon's /metrics)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz(port: int) -> tuple[int, dict]:
    """A daemon's /healthz: (HTTP status, the JSON body)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def recorded_prices(record: str) -> dict[int, list]:
    """Per token, the recorded packets' prices (raw, divisor) in order."""
    out: dict[int, list] = {}
    dec = KiteDecoder(capacity=1 << 16)
    for _ in decode_capture(record, dec):
        t = dec.ticks[:dec.n_ticks]
        for tok, p, d in zip(t["instrument_token"].tolist(), t["last_price"].tolist(),
                             t["divisor"].tolist()):
            out.setdefault(tok, []).append((p, d))
    return out
