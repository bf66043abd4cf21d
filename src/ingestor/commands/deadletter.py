"""``ingestor dead-letter list|replay DIR``: batches the writer set aside, and re-applying them.

The writer sets a batch aside when the database refuses its *data* (``max_rejects``
times); it commits the batch's offset and goes on, so the stream is not blocked but the
batch's rows are missing.  Once the cause is fixed (a widened column, a dropped trigger,
an instrument row added), ``replay`` re-applies each folder entry
(``<stream>-<first>-<last>.json`` and its ``.copy`` / ``.texts.jsonl`` files, see
:class:`ingestor.store.writer.DeadLetters`), one transaction each:

* **ticks** and **snapshots**: the COPY payloads, through a staging table, skipping rows
  whose key (``instrument_id, time``) is already stored;
* **candles**: *not* the batch's candle versions -- later batches upserted newer versions
  of the forming candles, which already include some of this batch's ticks, and the old
  versions would overwrite them.  The candles the batch touched (the keys of its candle
  payload) are recomputed from ``tick_data`` with the candle definition of
  :mod:`ingestor.store.candle_sql` and written as the writer writes them (upserted, or
  replaced where the timeframe has no key: ``candle_sql.apply_staged``);
* **a backfill's ticks** (``.backfill_ticks.copy``: older than the ticks stored for their
  instruments, with their own times) as the writer writes them: those not stored yet
  inserted, the candles they touch recomputed, the instruments' forming state released
  (``ingestor.store.writer``, ``_write_backfill``); their snapshots skip stored keys;
* **postbacks**: through the order store, which is idempotent (a postback already applied,
  or older than the stored state, changes nothing);

then the description is renamed ``<base>.applied.json``: a second run skips it, and would
change nothing anyway.  An entry the database still refuses is left as it was, with the
reason printed; the command then exits 1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os


def add_parser(sub) -> None:
    p = sub.add_parser("dead-letter", help="list or re-apply batches set aside by the writer",
                       description="Batches the database refused for their data are set aside "
                       "to the dead-letter folder ([writer] dead_letter_dir). 'list' shows them; "
                       "'replay' re-applies them once the cause is fixed: ticks and snapshots not "
                       "yet stored, the touched candles recomputed from tick_data, postbacks; "
                       "each applied entry is marked (.applied.json), so a second run changes "
                       "nothing.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    ls = actions.add_parser("list", help="the folder's entries and their reasons")
    ls.add_argument("dir", help="dead-letter folder")
    ls.set_defaults(func=run_list)
    rp = actions.add_parser("replay", help="re-apply the folder's entries")
    rp.add_argument("dir", help="dead-letter folder")
    rp.add_argument("--dsn", help="database (else INGESTOR_DSN, DATABASE_URL, libpq defaults)")
    rp.set_defaults(func=run_replay)
    p.set_defaults(func=_no_action, parser=p)


def _no_action(args) -> int:
    from ingestor.errors import UsageError

    raise UsageError(f"{args.parser.prog}: an action is required (list, replay)")


@dataclasses.dataclass
class Entry:
    """One dead-letter description and what replay did with it."""

    path: str                  # the .json (or .applied.json)
    meta: dict
    applied: bool              # marked applied (before this run, or by it)
    ticks_added: int = 0
    snapshots_added: int = 0
    candles_recomputed: int = 0
    postbacks: int = 0
    error: str | None = None

    @property
    def base(self) -> str:
        p = self.path
        return p[:-len(".applied.json")] if p.endswith(".applied.json") else p[:-len(".json")]


def entries(folder: str) -> list[Entry]:
    """The folder's descriptions, by stream and first sequence number."""
    from ingestor.errors import UsageError

    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: not a directory")
    out = []
    for path in glob.glob(os.path.join(glob.escape(folder), "*.json")):
        try:
            with open(path) as f:
                meta = json.load(f)
            key = (str(meta["stream"]), int(meta["first_seq"]), int(meta["last_seq"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}: not a dead-letter description ({exc})") from None
        out.append((key, Entry(path, meta, path.endswith(".applied.json"))))
    return [e for _, e in sorted(out, key=lambda kv: kv[0])]


def run_list(args) -> int:
    items = entries(args.dir)
    for e in items:
        m = e.meta
        state = "applied" if e.applied else "pending"
        print(f"{m['stream']} {m['first_seq']}..{m['last_seq']}  {state}  ticks {m.get('ticks', 0)} "
              f"candles {m.get('candles', 0)} snapshots {m.get('snapshots', 0)} "
              f"postbacks {m.get('texts', 0)}  set aside {m.get('set_aside_at', '?')}: "
              f"{m.get('reason', '')}")
    pending = sum(1 for e in items if not e.applied)
    print(f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}, {pending} pending")
    return 0


def run_replay(args) -> int:
    from ingestor.store.dsn import resolve_dsn

    done = replay_folder(resolve_dsn(args.dsn), args.dir)
    failed = 0
    for e in done:
        m = e.meta
        what = f"{m['stream']} {m['first_seq']}..{m['last_seq']}"
        if e.error is not None:
            failed += 1
            print(f"{what}: still refused: {e.error}")
        else:
            print(f"{what}: applied: {e.ticks_added} ticks, {e.snapshots_added} snapshots added, "
                  f"{e.candles_recomputed} candles recomputed, {e.postbacks} postbacks")
    print(f"{len(done) - failed} applied, {failed} refused")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------

def _stage(conn, table: str, stage: str, columns: str, payload: bytes) -> None:
    conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DROP")
    with conn.cursor().copy(f"COPY {stage} ({columns}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(payload)


def _insert_missing(conn, table: str, stage: str, columns: str, payload: bytes) -> int:
    """The payload's rows whose (instrument_id, time) ``table`` does not hold yet; how many."""
    _stage(conn, table, stage, columns, payload)
    return conn.execute(
        f"INSERT INTO {table} ({columns}) "
        f"SELECT DISTINCT ON (instrument_id, time) {columns} FROM {stage} s "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table} d WHERE d.instrument_id = "
        f"s.instrument_id AND d.time = s.time) ORDER BY instrument_id, time").rowcount


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def apply_entry(conn, entry: Entry, store=None) -> None:
    """Apply one entry in one transaction of ``conn`` (counts into ``entry``)."""
    from ingestor import _core
    from ingestor.pipeline import tables
    from ingestor.store.candle_sql import (CANDLE_LIST, RECOMPUTE_SQL, SQL_KEYS_TABLE, SQL_STAGE,
                                           apply_staged)

    base = entry.base
    tick_cols = ", ".join(c[0] for c in tables.TICK_COLUMNS)
    snap_cols = ", ".join(c[0] for c in tables.SNAPSHOT_COLUMNS)
    with conn.transaction():
        ticks = _read(f"{base}.ticks.copy")
        if ticks:
            entry.ticks_added = _insert_missing(conn, "tick_data", "ingestor_dl_ticks",
                                                tick_cols, ticks)
        snaps = _read(f"{base}.snapshots.copy")
        if snaps:
            entry.snapshots_added = _insert_missing(conn, "order_book_snapshots",
                                                    "ingestor_dl_snaps", snap_cols, snaps)
        # both parts of the batch's candles (upserted ones, and closed ones never stored)
        parts = [p for p in (_read(f"{base}.candles.copy"), _read(f"{base}.new_candles.copy"))
                 if p]
        if parts:
            # only the keys: the batch's candle values are stale (see the module docstring)
            for part in parts:
                _stage(conn, "ohlc_candles", "ingestor_dl_candles", CANDLE_LIST, part)
            labels = [r[0] for r in conn.execute(
                "SELECT DISTINCT timeframe FROM ingestor_dl_candles").fetchall()]
            conn.execute(SQL_KEYS_TABLE)
            conn.execute(
                "INSERT INTO ingestor_candle_keys (time, instrument_id, timeframe, stride_us) "
                "SELECT DISTINCT c.time, c.instrument_id, c.timeframe, s.us "
                "FROM ingestor_dl_candles c JOIN unnest(%s::text[], %s::bigint[]) AS s (tf, us) "
                "ON s.tf = c.timeframe",
                (labels, [_core.timeframe_us(t) for t in labels]))
            conn.execute(SQL_STAGE)
            conn.execute(RECOMPUTE_SQL)
            entry.candles_recomputed = apply_staged(conn)
        backfill = _read(f"{base}.backfill_ticks.copy")
        if backfill:
            entry.ticks_added += _apply_backfill(conn, backfill, entry.meta.get("backfill_clock"))
        snaps = _read(f"{base}.backfill_snapshots.copy")
        if snaps:
            entry.snapshots_added += _insert_missing(conn, "order_book_snapshots",
                                                     "ingestor_dl_snaps", snap_cols, snaps)
        texts = _read(f"{base}.texts.jsonl")
        if texts:
            from ingestor.orders.store import OrderStore

            store = store or OrderStore()
            lines = [json.loads(ln) for ln in texts.decode("utf-8").splitlines() if ln.strip()]
            stream = entry.meta["stream"]
            res = store.apply_sync(conn, [ln["text"] for ln in lines],
                                   [(stream, int(ln["seq"])) for ln in lines])
            entry.postbacks = res.applied


def _apply_backfill(conn, payload: bytes, clock: dict | None) -> int:
    """A backfill's tick rows, as the writer applies them (the same statements); how many
    were inserted."""
    import datetime as dt

    from ingestor.store import writer as w
    from ingestor.store.candle_sql import RECOMPUTE_SQL, SQL_KEYS_TABLE, SQL_STAGE, apply_staged

    if not clock:
        raise ValueError("a backfill entry without its backfill_clock (the candle buckets)")
    params = {"labels": clock["labels"], "strides": clock["strides_us"],
              "origin": dt.datetime.fromisoformat(clock["origin"])}
    conn.execute(w.SQL_BACKFILL_LOCK)
    conn.execute(w.SQL_BACKFILL_STAGE)
    with conn.cursor().copy(w.SQL_COPY_BACKFILL) as cp:
        cp.write(payload)
    conn.execute("ANALYZE ingestor_backfill_stage")
    conn.execute(w.SQL_BACKFILL_DROP_STORED)
    inserted = conn.execute(w.SQL_BACKFILL_INSERT).rowcount
    if inserted:
        conn.execute(SQL_KEYS_TABLE)
        conn.execute(w.SQL_BACKFILL_KEYS, params)
        conn.execute("ANALYZE ingestor_candle_keys")
        conn.execute(SQL_STAGE)
        conn.execute(RECOMPUTE_SQL)
        apply_staged(conn)
        conn.execute(w.SQL_BACKFILL_RELEASE_STATE, {"origin": params["origin"]})
    return inserted


def replay_folder(dsn: str, folder: str) -> list[Entry]:
    """Apply every pending entry of ``folder`` (see the module docstring); returns them."""
    import psycopg

    from ingestor.errors import DatabaseUnavailable
    from ingestor.orders.store import OrderStore
    from ingestor.store.dsn import connect
    from ingestor.store.errors import classify, describe_error
    from ingestor.store.migrate import require_current

    todo = [e for e in entries(folder) if not e.applied]
    if not todo:
        return []
    store = OrderStore()
    with connect(dsn) as conn:
        require_current(conn)
        conn.commit()
        for e in todo:
            try:
                apply_entry(conn, e, store)
                conn.commit()
            except psycopg.Error as exc:
                conn.rollback()
                if classify(exc) == "connection":
                    raise DatabaseUnavailable(f"lost the database: {describe_error(exc)} "
                                              f"(entries applied so far are marked)") from None
                e.error = describe_error(exc)
                continue
            done = e.base + ".applied.json"
            os.replace(e.path, done)
            e.path, e.applied = done, True
    return todo
