"""``ingestor replay CAPTURE``: the whole pipeline into the database, as fast as it can."""

from __future__ import annotations

import sys

from ingestor.progress import EVERY

#: ``ingestor replay``'s tick rows per transaction.  Larger than the daemon's: a replay is a
#: bulk load, and on TimescaleDB an instrument's ticks go straight into the columnstore only
#: when a transaction holds enough of them (``writer.direct_min_rows``, 100) -- 200k rows
#: give 100 per instrument over 2,000 instruments, 50k only 25.
FLUSH_ROWS = 200_000


def add_parser(sub) -> None:
    p = sub.add_parser("replay", help="replay a capture into the database",
                       description="Push a capture through decode, aggregation and binary COPY "
                       "into the database as fast as it can; prints ticks, candles, snapshots, "
                       "seconds, ticks/s and the time per stage. Exactly once: replaying the "
                       "same capture twice writes it once, and a replay interrupted (Ctrl-C, "
                       "exit status 130) says how far it committed: running it again resumes "
                       "there. Exit status 3: the capture held damaged records (skipped and "
                       "counted, each named by its byte offset; the intact ones around them written), "
                       "or, with --until-damage, stopped at the first.")
    p.add_argument("capture", help="capture file (.cap)")
    p.add_argument("--dsn", help="database (else INGESTOR_DSN, DATABASE_URL, libpq defaults)")
    p.add_argument("--flush-rows", type=int, default=FLUSH_ROWS,
                   help="tick rows per transaction (default %(default)s)")
    p.add_argument("--snapshot-interval", type=float, default=1.0,
                   help="seconds between depth snapshots per instrument (0: every full packet)")
    p.add_argument("--dead-letter-dir", default="dead-letter",
                   help="where batches the database refuses for their data are set aside "
                   "(default %(default)s)")
    p.add_argument("--no-direct-compress", dest="direct_compress", action="store_false",
                   help="TimescaleDB: send every tick to the rowstore instead of straight into "
                   "the columnstore (direct COPY is experimental in TimescaleDB)")
    p.add_argument("--direct-min-rows", type=int, default=100,
                   help="TimescaleDB: an instrument's ticks in one transaction go straight "
                   "into the columnstore from this many rows on (default 100)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="one transaction at a time on one connection, instead of writing the "
                   "next batch's rows on a second connection while the one before commits")
    p.add_argument("--backfill-tolerance", type=float, default=1.0, metavar="SECONDS",
                   help="a capture whose first tick of an instrument is more than this before "
                   "the instrument's last stored tick backfills it: its ticks keep their own "
                   "times, those already stored are skipped, the candles they touch are "
                   "recomputed (default %(default)s); within it, ticks are late ones, "
                   "restamped after the stored ones")
    from ingestor.commands.decode import add_until_damage

    add_until_damage(p, "committed")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a log line every "
                   "--progress-every seconds)")
    p.add_argument("--progress-every", type=float, default=EVERY, metavar="SECONDS",
                   help="seconds between progress log lines when stderr is not a terminal "
                   "(default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ingestor.feed.capture import CaptureError
    from ingestor.cli import UsageError
    from ingestor.store.dsn import resolve_dsn
    from ingestor.pipeline import PipelineSettings
    from ingestor.pipeline.replay import replay

    from ingestor.pipeline.replay import ReplayInterrupted

    if not 0 <= args.backfill_tolerance <= 86_400 * 365:
        raise UsageError("--backfill-tolerance must be between 0 and a year (seconds)")
    if args.flush_rows < 1 or args.snapshot_interval < 0 or args.direct_min_rows < 1:
        raise UsageError("--flush-rows and --direct-min-rows must be >= 1 and "
                         "--snapshot-interval >= 0")
    if not args.progress_every > 0:
        raise UsageError("--progress-every must be > 0")
    settings = PipelineSettings(flush_rows=args.flush_rows,
                                snapshot_interval_us=int(args.snapshot_interval * 1e6),
                                dense_rows=args.direct_min_rows,
                                backfill_tolerance_us=int(args.backfill_tolerance * 1e6))
    try:
        result = replay(args.capture, resolve_dsn(args.dsn), settings=settings,
                        dead_letter_dir=args.dead_letter_dir,
                        progress=False if args.no_progress else None,
                        direct_compress=args.direct_compress,
                        progress_every=args.progress_every, overlap=args.overlap,
                        until_damage=args.until_damage)
    except ReplayInterrupted as exc:
        print(f"ingestor: {exc}", file=sys.stderr)
        return 130
    except FileNotFoundError:
        raise UsageError(f"{args.capture}: no such file") from None
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(result.lines()))
    if result.damaged or result.lost_records:
        from ingestor.commands.decode import EXIT_DAMAGED, damage_lines, damage_note

        print("\n".join(damage_lines(args.capture, result.damage, result.unlisted_damage,
                                     result.stopped_at, result.left_bytes, "committed")))
        print(damage_note(args.capture, result.damage), file=sys.stderr)
        return EXIT_DAMAGED
    return 0
