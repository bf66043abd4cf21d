"""``ingestor dead-letter list|replay``: set-aside batches re-applied once the cause is fixed.

A trigger refuses the ticks of a time window with a data exception (SQLSTATE 22023), as a
too-narrow column or a bad value would: the writer sets those batches aside and goes on, so
later batches upsert newer versions of the forming candles (already including some of the
refused ticks).  Then the trigger is dropped and the folder replayed: every tick must be
there once, the candles must equal the SQL definition over ``tick_data`` (the replay must
not have put the refused batches' old candle versions back), and the database must equal
one the capture was replayed into without trouble.  A second run changes nothing.
"""

from __future__ import annotations

import json
import os

import psycopg
import pytest

from ingestor.cli import main
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture
from test_candles_sql import assert_candles_equal_sql
from test_restart import _candles, _ticks, other_db  # noqa: F401

REFUSE = """
CREATE FUNCTION refuse_window() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.time >= %(t0)s::timestamptz AND NEW.time < %(t1)s::timestamptz THEN
        RAISE EXCEPTION 'tick at % refused for the test', NEW.time USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_window BEFORE INSERT ON tick_data FOR EACH ROW EXECUTE FUNCTION refuse_window();
"""


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("dl") / "market.cap"
    generate_capture(path, ticks=30_000, tokens=30, mode="mixed", seed=17)
    return path


def _write_like_the_daemon(path, dsn, dead_dir, settings) -> list[str]:
    """The capture through a pipeline and a writer as the daemon drives them: batches as
    they fill, and the forming candles (1m and longer) upserted at a cadence in between --
    so a later batch holds a newer version of a candle an earlier one wrote."""
    import asyncio

    from ingestor.feed.capture import CaptureReader
    from ingestor.pipeline import Pipeline
    from ingestor.store.instruments import register_tokens
    from ingestor.store.writer import Writer

    async def run(pipe, rd):
        w = Writer(dsn, dead_letter_dir=str(dead_dir), max_rejects=2, retry_for=10)
        outcomes = []
        try:
            for chunk, seq in rd.chunks():
                for b in pipe.feed_chunk(chunk, seq):
                    outcomes.append(await w.write(b))
                if pipe.has_pending:
                    outcomes.append(await w.write(pipe.take()))    # the forming candles
            outcomes.append(await w.write(pipe.take(final=True)))
        finally:
            await w.close()
        return outcomes

    with psycopg.connect(dsn, autocommit=True) as setup, \
            CaptureReader(path, chunk_size=1 << 15) as rd:
        pipe = Pipeline(rd.header.stream, resolve=lambda toks: register_tokens(setup, toks),
                        settings=settings)
        return asyncio.run(run(pipe, rd))


def _digest(dsn) -> dict:
    with psycopg.connect(dsn) as conn:
        return {
            "ticks": _ticks(conn),
            "candles": _candles(conn),
            "snapshots": conn.execute("select instrument_id, time, bid_prices, ask_quantities "
                                      "from order_book_snapshots order by 1, 2").fetchall(),
            "offsets": conn.execute("select stream, committed_seq from stream_offsets "
                                    "order by 1").fetchall(),
        }


def test_replay_writes_the_ticks_fixes_the_candles_and_runs_once(db, other_db, capture,
                                                                 tmp_path, capsys):
    settings = PipelineSettings(flush_rows=2_000)
    # the reference: the capture replayed without trouble
    replay(str(capture), other_db, settings=settings, progress=False)
    reference = _digest(other_db)
    with psycopg.connect(other_db) as conn:
        t0, t1 = conn.execute("select percentile_disc(0.40) within group (order by time), "
                              "percentile_disc(0.47) within group (order by time) "
                              "from tick_data").fetchone()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(REFUSE.replace("%(t0)s", f"'{t0.isoformat()}'")
                     .replace("%(t1)s", f"'{t1.isoformat()}'"))

    dead = tmp_path / "dead"
    outcomes = _write_like_the_daemon(capture, db, dead, settings)
    assert outcomes.count("dead-letter") >= 1 and outcomes[-1] == "written"
    pending = sorted(p for p in os.listdir(dead) if p.endswith(".json"))
    assert len(pending) == outcomes.count("dead-letter")
    for name in pending:
        meta = json.loads((dead / name).read_text())
        assert meta["sqlstate"] == "22023" and "refused for the test" in meta["reason"]
    broken = _digest(db)
    assert len(broken["ticks"]) < len(reference["ticks"])
    # the set-aside batches hold old versions of forming candles that later batches updated:
    # putting those back would make the candles wrong (the replay recomputes them instead)
    with psycopg.connect(db) as conn:
        conn.execute("create temp table stale (like ohlc_candles)")
        for name in pending:
            with conn.cursor().copy("copy stale from stdin (format binary)") as cp:
                cp.write((dead / name.replace(".json", ".candles.copy")).read_bytes())
        assert conn.execute(
            "select count(*) from stale s join ohlc_candles o using (time, instrument_id, "
            "timeframe) where (s.close_price, s.trade_count) is distinct from "
            "(o.close_price, o.trade_count)").fetchone()[0] > 0
    assert broken["offsets"] == reference["offsets"]           # the stream went on
    assert broken["candles"] != reference["candles"]

    assert main(["dead-letter", "list", str(dead)]) == 0
    out = capsys.readouterr().out
    assert f"{len(pending)} pending" in out and "22023" in out

    # the cause is fixed; replay the folder
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("drop trigger refuse_window on tick_data")
    assert main(["dead-letter", "replay", str(dead), "--dsn", db]) == 0
    out = capsys.readouterr().out
    assert f"{len(pending)} applied, 0 refused" in out
    fixed = _digest(db)
    assert fixed["ticks"] == reference["ticks"]
    assert fixed["snapshots"] == reference["snapshots"]
    assert_candles_equal_sql(db)
    assert fixed["candles"] == reference["candles"]
    assert sorted(p for p in os.listdir(dead) if p.endswith(".json")) == \
        sorted(p[:-len(".json")] + ".applied.json" for p in pending)

    # a second run: nothing pending, nothing changes
    assert main(["dead-letter", "replay", str(dead), "--dsn", db]) == 0
    assert "0 applied, 0 refused" in capsys.readouterr().out
    assert _digest(db) == fixed
    # even with the markers gone (a crash between commit and rename): nothing changes
    for p in os.listdir(dead):
        if p.endswith(".applied.json"):
            os.replace(dead / p, dead / (p[:-len(".applied.json")] + ".json"))
    assert main(["dead-letter", "replay", str(dead), "--dsn", db]) == 0
    out = capsys.readouterr().out
    assert ": applied: 0 ticks, 0 snapshots added, 0 candles recomputed" in out
    assert _digest(db) == fixed


def test_replay_of_an_entry_still_refused_is_kept_pending(db, tmp_path, capsys):
    """The cause is not fixed yet: the entry stays pending, the command exits 1."""
    import asyncio

    from test_writer_errors import T0, tick_batch
    from ingestor.store.writer import Writer

    dead = tmp_path / "dead"
    w = Writer(db, dead_letter_dir=str(dead), max_rejects=1, retry_for=5)

    async def set_aside():
        try:
            return await w.write(tick_batch("r", 0, 1, [(T0, 1, "N\x00SE", "1")]))
        finally:
            await w.close()

    assert asyncio.run(set_aside()) == "dead-letter"
    assert main(["dead-letter", "replay", str(dead), "--dsn", db]) == 1
    assert "still refused: 22021" in capsys.readouterr().out
    assert os.path.exists(dead / "r-0-1.json")
    with psycopg.connect(db) as conn:
        assert conn.execute("select count(*) from tick_data").fetchone()[0] == 0


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["dead-letter", "list", str(tmp_path / "missing")]) == 2
    assert main(["dead-letter"]) == 2
    (tmp_path / "x.json").write_text("{not json")
    assert main(["dead-letter", "list", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "not a dead-letter description" in err


def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "s-0-1.json").write_text(json.dumps({"stream": "s", "first_seq": 0,
                                                     "last_seq": 1, "reason": "x"}))
    dsn = "host=127.0.0.1 port=1 user=nobody password=hunter2 dbname=x connect_timeout=5"
    assert main(["dead-letter", "replay", str(tmp_path), "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ingestor: error: cannot connect to") and len(err.splitlines()) == 1
    assert "hunter2" not in err
    assert os.path.exists(tmp_path / "s-0-1.json")
