"""``ingestor status``: ingestion at a glance, and an exit status a check can use.

One screen for the operator at 09:14 IST: per stream its committed offset and last commit,
the newest tick per exchange and its age, today's feed gaps, dead-lettered batches (the
writer's folder) and postbacks, rows and size per time-series table today, TimescaleDB's
columnstore/compression and policy jobs where it is installed, and -- given the spool
folder and the daemon's metrics address, or the daemon's config file that names both --
the spool's size and the daemon's ``/healthz``.  ``--json`` prints the same as one object.

Exit status 0 when nothing needs attention, 1 when something does (each reason is listed
under ``attention``), 2 on bad usage.  What needs attention depends on the trading calendar
(:mod:`ingestor.market_hours`): an exchange that has ticked before but whose newest tick is
older than ``--stale`` seconds while its session has been open longer than ``--grace``
seconds (no tick at 09:14 IST is normal; none at 11:00 on a trading day is not); a feed gap
still open while a session is open; a dead-lettered batch not yet replayed; a postback set
aside today; a daemon whose ``/healthz`` is not 200 or does not answer; a spool past its
alarm; a TimescaleDB policy job whose last run failed; a database that does not answer or
whose schema is not current.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os

from ingestor.market_hours import IST

#: default seconds without a tick, while a session is open, before an exchange needs attention
STALE = 60.0
#: default seconds after a session opens before a missing tick counts
GRACE = 120.0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "status", help="ingestion at a glance; exit 1 when something needs attention",
        description=__doc__.split("\n\n")[1] + " Exit status 0: nothing needs attention; "
        "1: something does (listed); 2: bad usage.")
    p.add_argument("--dsn", help="database (default: INGESTOR_DSN, DATABASE_URL, the config file's, "
                   "libpq defaults)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="the daemon's config file: its database, spool folder, dead-letter "
                   "folder and metrics address, unless given below; its relative folders "
                   "are taken from the current directory, as the daemon takes them from its "
                   "own (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="the daemon's metrics address, to read its /healthz (default: the "
                   "config file's metrics.listen; none without a config file)")
    p.add_argument("--spool-dir", metavar="DIR",
                   help="the daemon's spool folder (default: the config file's spool.dir)")
    p.add_argument("--dead-letter-dir", metavar="DIR",
                   help="the writer's dead-letter folder (default: the config file's "
                   "writer.dead_letter_dir)")
    p.add_argument("--stale", type=float, default=STALE, metavar="SECONDS",
                   help=f"an exchange's newest tick older than this while its session is open "
                   f"needs attention (default: {STALE:g})")
    p.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS",
                   help=f"seconds after a session opens before a missing tick counts "
                   f"(default: {GRACE:g})")
    p.add_argument("--session", action="append", default=[], metavar="NAME=HH:MM-HH:MM[@CAL]",
                   help="a segment's trading hours in IST and, optionally, its holiday calendar "
                   "(XNSE, XBOM, none); repeatable; sessions: equity (default 09:15-15:30), "
                   "currency (09:00-17:00), commodity (09:00-23:30); over the config file's "
                   "[sessions] and INGESTOR_SESSIONS (comma-separated)")
    p.add_argument("--at", metavar="TIMESTAMP",
                   help="judge as of this ISO time instead of now (no offset: IST), e.g. for "
                   "a post-mortem (default: now)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="connection and per-query time limit (default: 10)")
    p.set_defaults(func=run)


# -- gathering -----------------------------------------------------------------------------------

def _at(text: str | None) -> dt.datetime:
    from ingestor.errors import UsageError

    if text is None:
        return dt.datetime.now(IST)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at {text[:40]!r}: want an ISO time such as 2026-03-02T11:00 "
                         f"(no offset: IST)") from None
    return (t if t.tzinfo else t.replace(tzinfo=IST)).astimezone(IST)


def _sessions_report(sessions, at: dt.datetime) -> list[dict]:
    day = at.date()
    out = []
    for s in sessions:
        since = s.open_since(at)
        out.append({"name": s.name, "exchanges": list(s.exchanges), "opens": f"{s.opens:%H:%M}",
                    "closes": f"{s.closes:%H:%M}", "calendar": s.calendar,
                    "trading_day": s.is_trading_day(day), "holiday": s.holiday(day),
                    "open": since is not None, "open_seconds": since})
    return out


def _database(dsn: str, at: dt.datetime, timeout: float) -> dict:
    """Everything the database says; a part that cannot be read carries its reason."""
    from ingestor.errors import DatabaseError
    from ingestor.market_hours import day_start
    from ingestor.store import migrate as mig
    from ingestor.store import status as q
    from ingestor.store.dsn import connect, describe

    start = day_start(at)
    end = start + dt.timedelta(days=1)
    db: dict = {"target": describe(dsn), "reachable": False, "errors": {}}
    try:
        conn = connect(dsn, autocommit=True, connect_timeout=max(1, int(timeout)))
    except DatabaseError as exc:
        db["error"] = str(exc)
        return db
    errors = db["errors"]

    def part(name, fn, *a):
        try:
            return fn(*a)
        except q.Unavailable as exc:
            errors[name] = str(exc)
            return None

    with conn:
        db["reachable"] = True
        q.set_timeout(conn, timeout)
        db["server_version"] = conn.info.parameter_status("server_version")
        schema = part("schema", lambda: mig.current(conn))
        db["schema_current"] = None if schema is None else bool(schema)
        db["schema"] = None if schema is None else schema.message
        if not db["schema_current"] and not part("tables", q._has_table, conn, "stream_offsets"):
            return db  # nothing else to read from an empty database
        total_streams = part("streams", q.streams, conn)
        db["streams_total"], db["streams"] = total_streams or (None, [])
        db["newest_ticks"] = part("newest_ticks", q.newest_ticks, conn) or {}
        db["feed_gaps"] = part("feed_gaps", q.feed_gaps, conn, start, end) or []
        db["postback_dead_letters"] = part("postback_dead_letters", q.postback_dead_letters,
                                           conn, start, end)
        ts = db["timescaledb"] = part("timescaledb", q.timescale_version, conn)
        hyper = (part("hypertables", q.hypertables, conn) or {}) if ts else {}
        tables = []
        for name in q.TABLES:
            h = hyper.get(name)
            t = {"table": name, "hypertable": h is not None,
                 "rows_today": part(f"{name}.rows_today", q.rows_today, conn, name, start, end),
                 "bytes": part(f"{name}.bytes", q.table_bytes, conn, name, h is not None),
                 "bytes_today": None, "compression": None}
            if h is not None:
                t["chunks"] = h["chunks"]
                t["bytes_today"] = part(f"{name}.bytes_today", q.bytes_since, conn, name, start)
                if h["compression_enabled"]:
                    t["compression"] = part(f"{name}.compression", q.compression, conn, name)
            tables.append(t)
        db["tables"] = tables
        db["jobs"] = (part("jobs", q.jobs, conn) or []) if ts else []
    return db


def _dead_letter_batches(folder: str | None) -> dict | None:
    if not folder:
        return None
    from ingestor.commands.deadletter import entries
    from ingestor.errors import UsageError

    out: dict = {"dir": folder, "pending": [], "applied": 0}
    if not os.path.isdir(folder):
        out["note"] = "no such folder (nothing set aside yet)"
        return out
    try:
        items = entries(folder)
    except UsageError as exc:  # a file that is not a description: say so, do not stop
        out["error"] = str(exc)
        return out
    for e in items:
        if e.applied:
            out["applied"] += 1
        else:
            m = e.meta
            out["pending"].append({"stream": m["stream"], "first_seq": m["first_seq"],
                                   "last_seq": m["last_seq"], "reason": m.get("reason", ""),
                                   "set_aside_at": m.get("set_aside_at")})
    return out


def _spool(folder: str | None, max_bytes: int | None, alarm_at: float | None) -> dict | None:
    if not folder:
        return None
    out: dict = {"dir": folder, "files": 0, "bytes": 0, "alarm_bytes": None}
    if not os.path.isdir(folder):
        out["note"] = "no such folder"
        return out
    for path in glob.glob(os.path.join(glob.escape(folder), "*.cap")):
        try:
            out["bytes"] += os.path.getsize(path)
            out["files"] += 1
        except OSError:  # committed and removed while we looked
            pass
    if max_bytes:
        out["max_bytes"] = max_bytes
        out["alarm_bytes"] = int(max_bytes * (alarm_at or 1.0))
    return out


def _daemon(listen: str | None, timeout: float) -> dict | None:
    if not listen:
        return None
    import urllib.error
    import urllib.request

    url = f"http://{listen}/healthz"
    out: dict = {"url": url, "status": None, "health": None}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            out["status"], body = r.status, r.read(1 << 16)
    except urllib.error.HTTPError as exc:
        out["status"], body = exc.code, exc.read(1 << 16)
    except (OSError, ValueError) as exc:
        out["error"] = str(getattr(exc, "reason", None) or exc)
        return out
    try:
        out["health"] = json.loads(body)
    except ValueError:
        out["health"] = body.decode("utf-8", "replace")[:200]
    return out


# -- judging -------------------------------------------------------------------------------------

def attention(report: dict, sessions, *, stale: float, grace: float) -> list[str]:
    """Every reason the report needs a person, one line each (empty: all is well)."""
    from ingestor.market_hours import session_of

    at = dt.datetime.fromisoformat(report["at"])
    out: list[str] = []
    db = report["database"]
    if not db["reachable"]:
        out.append(f"database: {db.get('error', 'does not answer')}")
    elif db.get("schema_current") is False:
        out.append(f"database: {db['schema']}")
    any_open = False
    for ex, t in sorted(db.get("newest_ticks", {}).items()):
        s = session_of(ex, sessions)
        since = s.open_since(at) if s else None
        if since is None:
            continue
        any_open = True
        age = (at - t).total_seconds()
        if since > grace and age > stale:
            out.append(f"{ex}: newest tick {_age(age)} old ({_clock(t)}) while the {s.name} "
                       f"session is open (since {s.opens:%H:%M} IST)")
    if any_open:
        for g in db.get("feed_gaps", []):
            if g["ended_at"] is None:
                out.append(f"feed {g['connection']}: disconnected since {_clock(g['started_at'])}"
                           f" ({g['reason'] or 'no reason recorded'})")
    for name, why in db.get("errors", {}).items():
        if name != "schema":
            out.append(f"database: {name}: {why}")
    pb = db.get("postback_dead_letters")
    if pb and pb["today"]:
        out.append(f"postbacks: {pb['today']} set aside today (table postback_dead_letters)")
    for j in db.get("jobs", []):
        if (j["last_run_status"] or "").lower() == "failed":
            out.append(f"timescaledb: job {j['job_id']} ({j['proc']} on {j['table']}) failed "
                       f"its last run ({j['total_failures']} failures in all)")
    dl = report.get("dead_letter_batches")
    if dl:
        if dl.get("error"):
            out.append(f"dead letters: {dl['error']}")
        if dl["pending"]:
            out.append(f"dead letters: {len(dl['pending'])} batch(es) set aside in {dl['dir']} "
                       f"(`ingestor dead-letter list`, then `replay` once the cause is fixed)")
    sp = report.get("spool")
    if sp and sp.get("alarm_bytes") and sp["bytes"] >= sp["alarm_bytes"]:
        out.append(f"spool: {_bytes(sp['bytes'])} in {sp['dir']}, past its alarm "
                   f"({_bytes(sp['alarm_bytes'])}): the database is not keeping up or is away")
    d = report.get("daemon")
    if d:
        if d["status"] is None:
            out.append(f"daemon: {d['url']} does not answer ({d.get('error')})")
        elif d["status"] != 200:
            out.append(f"daemon: {d['url']} answers {d['status']}: {_health_line(d['health'])}")
    return out


def _health_line(h) -> str:
    if not isinstance(h, dict):
        return str(h)
    bad = [f"feed {k} down" for k, v in (h.get("feeds") or {}).items() if not v]
    if h.get("database") is False:
        bad.append("database not writable")
    if h.get("writer_stopped"):
        bad.append("writer stopped")
    if h.get("dead_letters"):
        bad.append(f"{h['dead_letters']} dead letter(s)")
    if h.get("spool_alarm"):
        bad.append("spool alarm")
    if h.get("spool_error"):
        bad.append(f"spool error: {h['spool_error']}")
    if h.get("failed"):
        bad.append(f"failed: {h['failed']}")
    return ", ".join(bad) or "unhealthy"


# -- output --------------------------------------------------------------------------------------

def _clock(t: dt.datetime | None) -> str:
    return "-" if t is None else t.astimezone(IST).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    s = int(abs(seconds))
    sign = "-" if seconds < 0 else ""
    if s < 120:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _jsonable(value):
    if isinstance(value, dt.datetime):
        return value.astimezone(IST).isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__int__") and not isinstance(value, (bool, int, float)):
        return int(value)
    return value


def render(report: dict) -> str:
    at = dt.datetime.fromisoformat(report["at"])
    db = report["database"]
    lines = [f"ingestor status at {_clock(at)} IST ({at:%A})"]
    add = lines.append
    where = db["target"]
    if db["reachable"]:
        kind = f"TimescaleDB {db['timescaledb']}" if db.get("timescaledb") else "plain tables"
        add(f"database   {where}: PostgreSQL {db.get('server_version')}, {kind}; "
            f"{db.get('schema') or ''}")
    else:
        add(f"database   {where}: {db.get('error')}")
    parts = []
    for s in report["sessions"]:
        if s["open"]:
            state = f"open {_age(s['open_seconds'])}"
        elif not s["trading_day"]:
            state = f"closed ({s['holiday'] or 'weekend'})"
        else:
            state = "closed"
        parts.append(f"{s['name']} {s['opens']}-{s['closes']} {state}")
    add("sessions   " + "; ".join(parts))
    if "tables" in db:  # a database with the schema (else the line above says why not)
        ticks = db.get("newest_ticks", {})
        add("")
        if ticks:
            add(f"{'exchange':<10} {'newest tick (IST)':<20} {'age':>9}")
            for ex, t in sorted(ticks.items()):
                add(f"{ex:<10} {_clock(t):<20} {_age((at - t).total_seconds()):>9}")
        else:
            add("no ticks stored yet")
        streams = db.get("streams", [])
        if streams:
            add("")
            add(f"{'stream':<40} {'committed':>12}  {'last commit (IST)':<20} {'age':>9}")
            for s in streams:
                add(f"{s['stream'][:40]:<40} {s['committed_seq']:>12}  {_clock(s['updated_at']):<20} "
                    f"{_age((at - s['updated_at']).total_seconds()):>9}")
            if (db.get("streams_total") or 0) > len(streams):
                add(f"  ({db['streams_total'] - len(streams)} older streams not shown)")
        gaps = db.get("feed_gaps", [])
        add("")
        add(f"feed gaps today: {len(gaps) or 'none'}")
        for g in gaps:
            end = g["ended_at"]
            dur = _age(((end or at) - g["started_at"]).total_seconds())
            add(f"  {g['connection']:<12} {_clock(g['started_at'])} -> "
                f"{_clock(end) if end else 'still open'} ({dur}, {g['tokens']} token(s)) "
                f"{g['reason'] or ''}")
        tables = db.get("tables", [])
        if tables:
            add("")
            add(f"{'table':<22} {'rows today':>12} {'size':>10} {'today':>10}  columnstore")
            for t in tables:
                c = t["compression"]
                comp = ("-" if not t["hypertable"] else "off" if c is None
                        else f"{c['compressed_chunks']}/{c['chunks']} chunks")
                rows = "?" if t["rows_today"] is None else f"{t['rows_today']:,}"
                add(f"{t['table']:<22} {rows:>12} {_bytes(t['bytes']):>10} "
                    f"{_bytes(t['bytes_today']):>10}  {comp}")
        for j in db.get("jobs", []):
            add(f"  job {j['job_id']} {j['proc']} on {j['table']}: last run "
                f"{j['last_run_status'] or 'never'} {_clock(j['last_run_started_at'])}, next "
                f"{_clock(j['next_start'])}")
        pb = db.get("postback_dead_letters") or {"today": 0}
        add("")
        add(f"postbacks set aside today: {pb['today']}")
    dl = report.get("dead_letter_batches")
    if dl:
        add(f"dead-letter batches in {dl['dir']}: {len(dl['pending'])} pending, "
            f"{dl['applied']} applied" + (f" ({dl['note']})" if dl.get("note") else ""))
        for e in dl["pending"][:5]:
            add(f"  {e['stream']} {e['first_seq']}..{e['last_seq']}: {e['reason']}")
    sp = report.get("spool")
    if sp:
        alarm = f", alarm at {_bytes(sp['alarm_bytes'])}" if sp.get("alarm_bytes") else ""
        add(f"spool {sp['dir']}: {sp['files']} file(s), {_bytes(sp['bytes'])}{alarm}"
            + (f" ({sp['note']})" if sp.get("note") else ""))
    d = report.get("daemon")
    if d:
        state = (f"{d['status']}" + ("" if d["status"] == 200 else f" ({_health_line(d['health'])})")
                 if d["status"] is not None else f"no answer ({d.get('error')})")
        add(f"daemon {d['url']}: {state}")
    add("")
    if report["attention"]:
        add("needs attention:")
        lines.extend(f"  - {a}" for a in report["attention"])
    else:
        add("nothing needs attention")
    return "\n".join(lines)


def run(args) -> int:
    from ingestor import market_hours
    from ingestor.errors import UsageError
    from ingestor.store.dsn import resolve_dsn

    if not args.stale > 0 or not args.grace >= 0 or not args.timeout > 0:
        raise UsageError("--stale and --timeout must be > 0, --grace >= 0")
    at = _at(args.at)
    cfg = None
    if args.config:
        from ingestor import config

        cfg = config.load(args.config)
    try:
        sessions = market_hours.from_env(extra=args.session,
                                         configured=cfg.sessions if cfg else None)
    except market_hours.SessionError as exc:
        raise UsageError(str(exc)) from None
    spool_dir = args.spool_dir or (cfg.spool.dir if cfg else None)
    dead_dir = args.dead_letter_dir or (cfg.writer.dead_letter_dir if cfg else None)
    listen = args.metrics if args.metrics is not None else (cfg.metrics.listen if cfg else None)
    dsn = resolve_dsn(args.dsn, config_dsn=cfg.database.dsn if cfg else None)

    report = {
        "at": at.isoformat(),
        "sessions": _sessions_report(sessions, at),
        "database": _database(dsn, at, args.timeout),
        "dead_letter_batches": _dead_letter_batches(dead_dir),
        "spool": _spool(spool_dir, cfg.spool.max_bytes if cfg else None,
                        cfg.spool.alarm_at if cfg else None),
        "daemon": _daemon(listen, args.timeout),
    }
    report["attention"] = attention(report, sessions, stale=args.stale, grace=args.grace)
    if args.json:
        print(json.dumps(_jsonable(report), indent=2, default=str))
    else:
        print(render(report))
    return 1 if report["attention"] else 0
