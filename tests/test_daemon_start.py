"""The daemon's start and stop, as an operator meets them: one daemon per spool folder, the
database or the feed down at start, every metric series there from the start, a repeated
stop signal, and a restart over a large crash leftover."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
from daemon_harness import (
    free_port,
    Daemon,
    Simulator,
    count_ticks,
    ingestor,
    load_instruments,
    tick_summary,
    wait_for,
)
from pg_private import private_pg, private_pg_running  # noqa: F401 - fixtures



def spool_files(tmp_path) -> list:
    return list((tmp_path / "spool").glob("*.cap"))


def test_second_daemon_on_the_same_spool_is_refused(tmp_path, db):
    sim = Simulator(tmp_path, tokens=5, rate=500)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: count_ticks(db) > 100)
    d2 = Daemon(tmp_path, db, sim.url, name="daemon2")
    rc = d2.proc.wait(timeout=30)
    out = d2.output()
    assert rc == 1, out
    assert f"in use by process {d.proc.pid}" in out, out
    assert len([ln for ln in out.splitlines() if ln.strip()]) == 1, out
    sim.stop()
    assert d.terminate() == 0, d.output()
    n, distinct = tick_summary(db)
    assert n == distinct == sim.sent_packets()


def test_database_down_at_start_spools_then_writes(tmp_path, private_pg_running):
    """After a reboot the feed may be up before the database: the daemon starts, subscribes
    the set the last run subscribed (kept beside the spool), receives and spools, and writes
    everything once the database answers."""
    cluster = private_pg_running
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets, feed_gaps")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    sim = Simulator(tmp_path / "s1", tokens=8, rate=1000)
    load_instruments(dsn, sim.csv)
    d = Daemon(tmp_path, dsn, sim.url)
    wait_for(lambda: count_ticks(dsn) > 200)
    sim.stop()  # first: what it sends while the daemon stops would be recorded, not received
    assert d.terminate() == 0, d.output()
    assert (tmp_path / "spool" / "subscriptions.json").exists()
    before = count_ticks(dsn)
    assert before == sim.sent_packets()

    cluster.stop("fast")
    sim2 = Simulator(tmp_path / "s2", tokens=8, rate=1000)
    try:
        d2 = Daemon(tmp_path, dsn, sim2.url, name="daemon2")
        # receiving and spooling while the database is away
        wait_for(lambda: "connected (stream" in d2.output(), timeout=30)
        wait_for(lambda: sum(p.stat().st_size for p in spool_files(tmp_path)) > 100_000,
                 timeout=30)
        assert d2.proc.poll() is None, d2.output()
        assert "subscribes the 8 instruments the last run subscribed" in d2.output()
    finally:
        cluster.start()
    wait_for(lambda: count_ticks(dsn) > before + 2000, timeout=60)
    sim2.stop()
    assert d2.terminate() == 0, d2.output()
    n, distinct = tick_summary(dsn)
    assert n == distinct == before + sim2.sent_packets()


def test_feed_down_at_start_is_retried(tmp_path, db):
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    # the instruments first (the simulator writes the dump it serves), then the daemon with the
    # feed down, then the feed
    probe = Simulator(tmp_path, tokens=6, rate=100)
    load_instruments(db, probe.csv)
    probe.stop()
    d = Daemon(tmp_path, db, url)
    wait_for(lambda: "cannot connect" in d.output(), timeout=30)
    assert d.proc.poll() is None, d.output()
    sim = Simulator(tmp_path, "--listen", f"127.0.0.1:{port}", tokens=6, rate=1000)
    wait_for(lambda: count_ticks(db) > 500, timeout=60)
    sim.stop()
    assert d.terminate() == 0, d.output()
    n, distinct = tick_summary(db)
    assert n == distinct == sim.sent_packets()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_every_metric_series_exists_from_the_start(tmp_path, db):
    """A feed the broker rejects (HTTP 403) never connects: the alert on
    ingestor_feed_connected == 0 must still have a series to fire on."""
    sim = Simulator(tmp_path, "--reject-token", tokens=4, rate=100)
    load_instruments(db, sim.csv)
    port = free_port()
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        "[feed]\nmode = \"full\"\nheartbeat_timeout = 2.0\nreconnect_min = 0.1\n"
        "reconnect_max = 0.5\nrejected_retry = 30.0\n"
        f"[spool]\ndir = \"{tmp_path / 'spool3'}\"\n"
        f"[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
    env = dict(os.environ, KITE_API_KEY="test-key", KITE_ACCESS_TOKEN="test-token-secret")
    log = open(tmp_path / "m.log", "w")
    proc = subprocess.Popen(ingestor("run", "--config", str(cfg), "--dsn", db, "--url", sim.url),
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "rejected" in (tmp_path / "m.log").read_text(), timeout=30)
        status, text = wait_for(lambda: _try_get(f"http://127.0.0.1:{port}/metrics"), timeout=30)
        assert status == 200
        for series in ('ingestor_feed_connected{connection="kite-0"} 0.0',
                       'ingestor_feed_reconnects_total{connection="kite-0"}',
                       'ingestor_messages_received_total{connection="kite-0",kind="binary"} 0.0',
                       'ingestor_malformed_messages_total{reason="truncated"} 0.0',
                       'ingestor_malformed_messages_total{reason="unknown_length"} 0.0',
                       'ingestor_ticks_decoded_total 0.0',
                       'ingestor_batches_total{outcome="dead-letter"} 0.0'):
            assert series in text, series
        assert "test-token-secret" not in text and "test-key" not in text
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and '"kite-0": false' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log.close()
        sim.stop()


def _try_get(url: str):
    try:
        return _get(url)
    except OSError:
        return None


def test_repeated_signal_is_one_stop_request(tmp_path, db):
    """``timeout`` and process managers may signal twice at once: that is one request, and
    the daemon still drains and commits everything (exit 0)."""
    sim = Simulator(tmp_path, tokens=10, rate=2000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: count_ticks(db) > 1000)
    sim.stop()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    rc = d.proc.wait(timeout=60)
    d.log.close()
    out = d.output()
    assert rc == 0, out
    assert "already stopping" in out
    n, distinct = tick_summary(db)
    assert n == distinct == sim.sent_packets()
    assert not spool_files(tmp_path), "a clean stop leaves no spool behind"


def test_restart_over_a_crash_leftover_receives_at_once(tmp_path, db):
    """SIGKILL with spool left: the restarted daemon is connected and spooling within seconds,
    while the leftover drains (in order, exactly once) through the same driver."""
    sim = Simulator(tmp_path, tokens=20, rate=4000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: count_ticks(db) > 2000)
    d.kill()
    assert spool_files(tmp_path)
    t0 = time.monotonic()
    d2 = Daemon(tmp_path, db, sim.url, name="daemon2")
    wait_for(lambda: "connected (stream" in d2.output(), timeout=30)
    connected_after = time.monotonic() - t0
    wait_for(lambda: "replayed spool left by an earlier run" in d2.output(), timeout=60)
    wait_for(lambda: count_ticks(db) > 8000, timeout=60)
    sim.stop()
    assert d2.terminate() == 0, d2.output()
    n, distinct = tick_summary(db)
    assert n == distinct
    out = d2.output()
    # connected before the leftover was replayed: the feed does not wait for recovery
    assert out.index("connected (stream") < out.index("replayed spool left by an earlier run")
    assert connected_after < 30
    with psycopg.connect(db) as c:
        assert c.execute("select count(*) from stream_offsets").fetchone()[0] == 2


def test_two_feeds_in_one_daemon(tmp_path, db):
    """Two [[feeds]] (two API keys, or two brokers' endpoints): each its own connections,
    credentials and streams, one pipeline per connection, every tick once."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Simulator(tmp_path / "a", tokens=6, rate=1000, seed=5)
    b = Simulator(tmp_path / "b", tokens=12, rate=1000, seed=6)
    load_instruments(db, a.csv)
    import csv as csv_mod

    def tokens_of(path):
        with open(path) as f:
            return [int(r["instrument_token"]) for r in csv_mod.DictReader(f)]
    ta = tokens_of(a.csv)
    tb = [t for t in tokens_of(b.csv) if t not in ta]
    assert tb, "the two simulated universes share every token"
    (tmp_path / "b.env").write_text("api_key=bkey1234\naccess_token=btoken1234\n")
    cfg = tmp_path / "two.toml"
    cfg.write_text(
        f'[[feeds]]\nname = "alpha"\nurl = "{a.url}"\ntokens = {ta}\nheartbeat_timeout = 2.0\n'
        f'api_key_env = "KITE_API_KEY"\naccess_token_env = "KITE_ACCESS_TOKEN"\n'
        f'[[feeds]]\nname = "beta"\nurl = "{b.url}"\ntokens = {tb}\nheartbeat_timeout = 2.0\n'
        f'credentials_file = "{tmp_path / "b.env"}"\n'
        f'[spool]\ndir = "{tmp_path / "spool"}"\n[metrics]\nlisten = ""\n')
    env = dict(os.environ, KITE_API_KEY="akey1234", KITE_ACCESS_TOKEN="atoken1234")
    log = open(tmp_path / "two.log", "w")
    proc = subprocess.Popen(ingestor("run", "--config", str(cfg), "--dsn", db), env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def streams():
            with psycopg.connect(db) as c:
                return {r[0].rsplit("-", 1)[0] for r in c.execute("select stream from stream_offsets")}
        wait_for(lambda: streams() >= {"alpha-0", "beta-0"}, timeout=60)
        a.stop()
        b.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "two.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "two.log").read_text()
    assert "atoken1234" not in out and "btoken1234" not in out
    n, distinct = tick_summary(db)
    assert n == distinct == a.sent_packets() + b.sent_packets()


def test_registration_refused_for_a_privilege_stops_loudly(tmp_path, db):
    """Registering new instruments is retried only while the database is away: a refusal
    that no retry can pass (here a missing privilege) stops the daemon with the reason and
    exit 1 (the spool keeps the messages), instead of a warning every few seconds forever."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    role = f"ingestor_noreg_{os.getpid()}"
    with psycopg.connect(db, autocommit=True) as c:
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        c.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
        c.execute(f"GRANT CREATE, TEMPORARY ON DATABASE {conninfo_to_dict(db)['dbname']} "
                  f"TO {role}")
        c.execute(f"REVOKE INSERT ON instruments FROM {role}")
    dsn = make_conninfo(db, user=role)
    sim = Simulator(tmp_path, tokens=5, rate=500)
    try:
        import csv

        with open(sim.csv) as f:
            tokens = [int(r["instrument_token"]) for r in csv.DictReader(f)]
        d = Daemon(tmp_path, dsn, sim.url, feed=f"tokens = {tokens}\n")
        try:
            wait_for(lambda: d.proc.poll() is not None, timeout=60)
        finally:
            if d.proc.poll() is None:
                d.kill()
        out = d.output()
        assert d.proc.returncode == 1, out
        assert "permission denied for table instruments" in out, out
        assert "cannot register" not in out, out
    finally:
        sim.stop()
        with psycopg.connect(db, autocommit=True) as c:
            c.execute(f"DROP OWNED BY {role}")
            c.execute(f"DROP ROLE {role}")


def test_database_down_at_start_without_tokens_or_saved_set_is_one_error(tmp_path):
    """Database away at start, no ``tokens`` and no ``subscriptions.json`` beside the spool
    (a first start after a reboot): nothing to subscribe, so one error line naming both
    remedies, before anything connects to the broker.  Exit 1, not 2: the settings are
    not wrong (the unit's ``RestartPreventExitStatus=2`` would leave the service dead), the
    database is only not there yet, so the service manager's restart gets it going once
    it answers."""
    import socket

    db_port = free_port()  # nobody listens: the database is down
    dsn = f"postgresql://ingestor:db-password-secret@127.0.0.1:{db_port}/ingestor"
    with socket.socket() as broker:  # a "broker" that only notes whether anyone came
        broker.bind(("127.0.0.1", 0))
        broker.listen(8)
        broker.setblocking(False)
        url = f"ws://127.0.0.1:{broker.getsockname()[1]}"
        d = Daemon(tmp_path, dsn, url)
        try:
            rc = d.proc.wait(timeout=60)
        finally:
            if d.proc.poll() is None:
                d.kill()
        d.log.close()
        out = d.output()
        try:
            broker.accept()[0].close()
            connected = True
        except BlockingIOError:
            connected = False
    assert rc == 1, out
    errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, out
    assert errors[0].startswith("ingestor: error: "), out
    assert "the database is not reachable" in errors[0], out
    assert "beside the spool" in errors[0] and "tokens" in errors[0], out
    assert "Traceback" not in out, out
    assert "db-password-secret" not in out and "test-token-secret" not in out, out
    assert not connected, "the daemon connected to the broker before giving up"
    assert not (tmp_path / "spool" / "subscriptions.json").exists()
    assert not spool_files(tmp_path)


def _scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics, one scrape: series (with labels) -> value."""
    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            series, _, value = ln.rpartition(" ")
            out[series] = float(value)
    return out


def test_second_signal_seconds_later_forces_the_exit(tmp_path, db):
    """A drain that cannot finish (tick_data locked by another session, so the writer's
    transaction waits, with a long shutdown_timeout): the first SIGINT starts it; a second
    one later than the repeat window is the operator insisting, and the daemon exits at
    once with status 1, the spool keeping what was not committed: a restart writes all of
    it, once."""
    from ingestor.daemon import SIGNAL_REPEAT

    sim = Simulator(tmp_path, tokens=10, rate=2000)
    load_instruments(db, sim.csv)
    port = free_port()
    feeds = (f"shutdown_timeout = 600.0\n[feed]\nurl = \"{sim.url}\"\nmode = \"full\"\n"
             "heartbeat_timeout = 2.0\nreconnect_min = 0.1\nreconnect_max = 0.5\n"
             "rejected_retry = 30.0\n")
    d = Daemon(tmp_path, db, None, feeds=feeds, metrics_port=port)
    locker = None
    try:
        wait_for(lambda: count_ticks(db) > 1000, timeout=60)
        locker = psycopg.connect(db)
        locker.execute("LOCK TABLE tick_data IN ACCESS EXCLUSIVE MODE")
        # the pipeline goes on decoding what the writer cannot commit (until the writer's
        # queue is full)
        start = _scrape(port)["ingestor_ticks_decoded_total"]
        wait_for(lambda: _scrape(port)["ingestor_ticks_decoded_total"] > start + 500,
                 timeout=60, what="decoding while the writer waits on the lock")
        sim.stop()
        sent = sim.sent_packets()
        d.proc.send_signal(signal.SIGINT)
        first = time.monotonic()
        wait_for(lambda: "SIGINT: stopping: draining" in d.output(), timeout=30)
        # "seconds later": past the window in which a repeat is the same request, the
        # daemon still draining (alive) all along
        wait_for(lambda: d.proc.poll() is not None
                 or time.monotonic() - first > SIGNAL_REPEAT + 0.5, timeout=60)
        assert d.proc.poll() is None, d.output()
        d.proc.send_signal(signal.SIGINT)
        rc = d.proc.wait(timeout=30)  # promptly: the drain alone would take 600 s
        d.log.close()
        out = d.output()
        assert rc == 1, out
        assert "second SIGINT: exiting at once" in out, out
        assert "already stopping" not in out, out
    finally:
        if d.proc.poll() is None:
            d.kill()
        if locker is not None:
            locker.close()  # (rolls back: the lock goes)
        sim.stop()
    written = count_ticks(db)
    assert written < sent, "the drain was not held up: nothing left to force"
    assert spool_files(tmp_path), "the uncommitted messages were not kept"
    d2 = Daemon(tmp_path, db, sim.url, name="daemon2")
    wait_for(lambda: "replayed spool left by an earlier run" in d2.output(), timeout=120)
    assert d2.terminate() == 0, d2.output()
    n, distinct = tick_summary(db)
    assert n == distinct == sent


def test_written_never_runs_ahead_of_decoded(tmp_path, db):
    """Counters that must agree do: at every scrape during a run, ticks written <= ticks
    decoded (one scrape reads both); once the feed has stopped and the daemon has written
    everything, written == decoded == tick_data's rows == what the simulator sent, and the
    daemon's final line says the same number."""
    sim = Simulator(tmp_path, tokens=20, rate=3000)
    load_instruments(db, sim.csv)
    port = free_port()
    d = Daemon(tmp_path, db, sim.url, metrics_port=port)
    try:
        scrapes = []

        def scrape_during_run():
            try:
                m = _scrape(port)
            except OSError:  # not listening yet
                assert not scrapes, "the metrics endpoint went away during the run"
                return False
            w, dec = m["ingestor_ticks_written_total"], m["ingestor_ticks_decoded_total"]
            assert w <= dec, (w, dec, scrapes)
            scrapes.append((w, dec))
            # several scrapes with writes under way, the last after some thousands
            return len([s for s in scrapes if s[0] > 0]) >= 20 and w > 5000

        wait_for(scrape_during_run, timeout=90, step=0.05, what="scrapes while writing")
        sim.stop()
        sent = sim.sent_packets()

        def drained():
            m = _scrape(port)
            w, dec = m["ingestor_ticks_written_total"], m["ingestor_ticks_decoded_total"]
            assert w <= dec, (w, dec)
            return w == dec == sent and (w, dec)

        written, decoded = wait_for(drained, timeout=60, what="written == decoded == sent")
        assert count_ticks(db) == written
        rc = d.terminate()
    finally:
        if d.proc.poll() is None:
            d.kill()
        sim.stop()
    out = d.output()
    assert rc == 0, out
    assert f"stopped: {int(written)} ticks," in out.splitlines()[-1], out
    n, distinct = tick_summary(db)
    assert n == distinct == written
