"""``ingestor decode CAPTURE [--jsonl]``: decode a capture, summarize or print ticks.

Exit status 3 (``EXIT_DAMAGED``): the capture held damaged records; the intact ones were
decoded and printed all the same, the summary counts the damage.
"""

from __future__ import annotations

import sys
import time

import msgspec

from ingestor.feed.capture import CaptureError, CaptureReader

#: the exit status of ``decode`` and ``replay`` when the capture held damaged records (the
#: intact records around them were processed)
EXIT_DAMAGED = 3


def add_until_damage(p, done: str) -> None:
    p.add_argument("--until-damage", action="store_true",
                   help=f"stop at the first damaged record: the records before it are {done}, "
                   "the summary says where it lies and how many bytes were left (exit status "
                   "3); default: skip each damaged stretch and go on after it")


def damage_lines(path: str, damage: list, unlisted: int, stopped_at, left_bytes: int,
                 done: str) -> list[str]:
    """One line per damaged stretch (file, byte offset, records lost), and where an
    ``--until-damage`` run stopped."""
    out = ["  " + d.describe(path) for d in damage if d is not stopped_at]
    if unlisted:
        out.append(f"  ... and {unlisted} more damaged stretch(es), counted only")
    if stopped_at is not None:
        out.append(f"stopped at the first damage (--until-damage): {stopped_at.describe(path)}; "
                   f"the records before it {done}, {left_bytes} bytes from there on not "
                   f"processed (without --until-damage the intact records after it are "
                   f"{done} too)")
    return out


def damage_note(path: str, damage: list) -> str:
    """The last line of a run that met damage."""
    where = f" (first at byte offset {damage[0].start})" if damage else ""
    return f"ingestor: {path}: damaged records found{where} (exit status {EXIT_DAMAGED})"


def add_parser(sub) -> None:
    p = sub.add_parser("decode", help="decode a capture file",
                       description="Decode a capture file. Prints counts per mode, per "
                       "message kind and per error reason; with --jsonl, one JSON object "
                       "per tick (the official Kite client's keys; for an Angel One capture "
                       "the official smartapi-python client's) on stdout instead, and "
                       "the summary on stderr. Exit status 3: the capture held damaged "
                       "records (skipped and counted, each named by its byte offset; the intact ones "
                       "around them decoded), or, with --until-damage, stopped at the first.")
    p.add_argument("capture", help="capture file (.cap)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per tick")
    p.add_argument("--summary-json", action="store_true", help="print the summary as JSON")
    add_until_damage(p, "decoded")
    p.set_defaults(func=run)


def summarize(stats: dict, seconds: float, reader: CaptureReader) -> dict:
    """The summary (``--summary-json``); ``format_summary`` prints it for people."""
    if reader.header.broker == "angel":
        return _summarize_angel(stats, seconds, reader)
    errors = {k: stats[k] for k in ("empty_message", "unknown_length", "truncated",
                                    "trailing_bytes", "bad_records", "bad_time")}
    return _summary(stats, seconds, reader,
                    {"binary": stats["messages"] - stats["heartbeats"],
                     "heartbeat": stats["heartbeats"], "text": stats["text_messages"]},
                    ("ltp", "quote", "full", "index_quote", "index_full"), errors)


def _summary(stats: dict, seconds: float, reader: CaptureReader, messages: dict, modes,
             errors: dict) -> dict:
    """What every broker's summary holds, around its own messages, modes and errors."""
    return {
        "stream": reader.header.stream,
        "broker": reader.header.broker,
        "messages": messages,
        "ticks": stats["packets"],
        "modes": {k: stats[k] for k in modes},
        "malformed_messages": stats["malformed_messages"],
        "errors": errors,
        "truncated_record_bytes": reader.truncated_bytes,
        "damaged": {"stretches": reader.damaged, "bytes": reader.damaged_bytes,
                    "records_lost": reader.lost_records,
                    "at": [d.to_dict() for d in reader.damage],
                    "not_listed": reader.unlisted_damage},
        "stopped_at_damage": (None if reader.stopped_at is None
                              else dict(reader.stopped_at.to_dict(),
                                        bytes_left=reader.left_bytes)),
        "seconds": round(seconds, 6),
        "ticks_per_s": round(stats["packets"] / seconds) if seconds > 0 else None,
    }


def _summarize_angel(stats: dict, seconds: float, reader: CaptureReader) -> dict:
    """The summary of a SmartStream capture: its decoder's counters (one packet a message;
    no heartbeats: pings are control frames or texts)."""
    from ingestor._core import SS_COUNTER_NAMES

    modes = ("ltp", "quote", "snap_quote", "depth")
    skip = {"messages", "text_messages", "bytes", "packets", "malformed_messages", *modes}
    return _summary(stats, seconds, reader,
                    {"binary": stats["messages"], "text": stats["text_messages"]}, modes,
                    {k: stats[k] for k in SS_COUNTER_NAMES if k not in skip})


def format_summary(s: dict) -> str:
    lines = [
        f"stream {s['stream']} ({s['broker']})",
        "messages: " + ", ".join(f"{k} {v}" for k, v in s["messages"].items()),
        f"ticks: {s['ticks']}  (" + ", ".join(f"{k} {v}" for k, v in s["modes"].items()) + ")",
        f"malformed messages: {s['malformed_messages']}  ("
        + ", ".join(f"{k} {v}" for k, v in s["errors"].items()) + ")",
    ]
    d = s["damaged"]
    if d["stretches"] or d["records_lost"]:
        lines.append(f"damaged: {d['stretches']} stretch(es), {d['bytes']} bytes, "
                     f"{d['records_lost']} record(s) lost"
                     + (" (skipped; the intact records around them decoded)"
                        if s["stopped_at_damage"] is None else ""))
        lines.extend(s.get("damage_lines", []))
    if s["truncated_record_bytes"]:
        lines.append(f"truncated last record: {s['truncated_record_bytes']} bytes ignored")
    if s["ticks_per_s"] is not None:
        lines.append(f"decoded in {s['seconds']:.3f} s: {s['ticks_per_s']:,} ticks/s")
    return "\n".join(lines)


def run(args) -> int:
    from ingestor._core import KiteDecoder, SmartStreamDecoder
    from ingestor.cli import UsageError

    try:
        reader = CaptureReader(args.capture, until_damage=args.until_damage)
    except FileNotFoundError:
        raise UsageError(f"{args.capture}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{args.capture}: is a directory") from None
    except CaptureError as exc:
        raise UsageError(str(exc)) from None
    if reader.header.broker not in ("kite", "angel"):
        raise UsageError(f"{args.capture}: broker {reader.header.broker!r} is not supported "
                         "(kite, angel)")
    # the header says whose frames: Angel One's SmartStream, or Kite's
    angel = reader.header.broker == "angel"
    dec = SmartStreamDecoder(capacity=1 << 15) if angel else KiteDecoder(capacity=1 << 15)
    out = sys.stdout.buffer
    enc = msgspec.json.Encoder()
    t0 = time.perf_counter()
    with reader:
        try:
            if angel and args.jsonl:
                # one line per packet the decoder took, in the official client's shape
                _angel_jsonl(reader, dec, out, enc)
            else:
                _decode(args, reader, dec, out, enc)
        except CaptureError as exc:
            raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - t0
    summary = summarize(dec.stats(), seconds, reader)
    dest = sys.stderr if args.jsonl else sys.stdout
    if args.summary_json:
        print(msgspec.json.encode(summary).decode(), file=dest)
    else:
        summary["damage_lines"] = damage_lines(args.capture, reader.damage,
                                               reader.unlisted_damage, reader.stopped_at,
                                               reader.left_bytes, "decoded")
        print(format_summary(summary), file=dest)
    out.flush()
    if reader.damage_found:
        print(damage_note(args.capture, reader.damage), file=sys.stderr)
        return EXIT_DAMAGED
    return 0


def _decode(args, reader: CaptureReader, dec, out, enc) -> None:
    """The capture through the decoder's batch path; with ``--jsonl`` (Kite) the ticks as
    the official client's dicts."""
    from ingestor.pipeline.batch import decode_capture

    for _ in decode_capture(args.capture, dec, reader=reader):
        if args.jsonl and dec.n_ticks:
            from ingestor.jsonl import tick_dicts

            buf = bytearray()
            for d in tick_dicts(dec.ticks[:dec.n_ticks], dec.depth[:dec.n_depth]):
                enc.encode_into(d, buf, -1)
                buf += b"\n"
            out.write(buf)


def _angel_jsonl(reader: CaptureReader, dec, out, enc) -> None:
    from ingestor.jsonl import smartstream_dict

    buf = bytearray()
    for chunk, seq in reader.chunks():
        mv = memoryview(chunk)
        pos = 0
        while pos < len(chunk):
            start = pos
            pos, seq_after, _ = dec.feed_capture(chunk, pos, seq)
            # packets the decoder took, in order: ticks and depth20 rows by sequence number
            t, d = dec.ticks[:dec.n_ticks], dec.depth20[:dec.n_depth20]
            taken = sorted(zip(t["seq"].tolist() + d["seq"].tolist(),
                               t["recv_ns"].tolist() + d["recv_ns"].tolist()))
            if taken:
                frames = _payloads(mv[start:pos], seq)
                for s, recv_ns in taken:
                    enc.encode_into(smartstream_dict(frames[s], recv_ns), buf, -1)
                    buf += b"\n"
            dec.clear()
            seq = seq_after
            if len(buf) > 1 << 20:
                out.write(buf)
                buf.clear()
    out.write(buf)


def _payloads(records, first_seq: int) -> dict:
    """{seq: payload} of whole capture records (the bytes one ``feed_capture`` call walked)."""
    from ingestor.feed.capture import iter_records

    return {first_seq + k: records[pos:pos + plen]
            for k, (pos, plen, _, _) in enumerate(iter_records(records))}
