"""``ingestor simulate``: a simulated Kite market, to a capture file or served live.

``ingestor simulate --out FILE.cap --ticks N [--tokens K] [--mode M] [--seed S]
[--instruments-csv FILE.csv]`` writes a deterministic capture (see
``ingestor.sim.market``) and prints a one-line summary.

``ingestor simulate --listen HOST:PORT [--tokens K] [--rate TICKS_PER_S]
[--duration S] [--seed S] [--record FILE.cap] [--instruments-csv FILE.csv]
[--postbacks PER_S]`` plus fault-injection flags serves the Kite ticker
protocol (``ingestor.sim.server``): it writes the instruments CSV first,
prints ``listening on ws://HOST:PORT`` (the real port when given 0) as one
line, serves until ``--duration`` passes or SIGTERM/SIGINT, closes the
connections gracefully and exits 0 with a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

from ingestor.cli import Failure, UsageError

MODES = ("ltp", "quote", "full", "mixed")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="simulate a Kite market (capture file)",
        description="Write a realistic, seeded Kite capture: random walks on tick grids "
                    "across all segments, depth ladders, heartbeats between bursts.")
    p.add_argument("--broker", choices=("kite", "angel"), default="kite",
                   help="the protocol: kite (default) or angel (Angel One SmartStream: "
                        "--out/--ticks, or --listen with --rate, --duration, --record, "
                        "--expected-token as the feed token, --scrip-master)")
    p.add_argument("--scrip-master", metavar="FILE.json",
                   help="angel: write the universe as an OpenAPIScripMaster.json")
    model = p.add_argument_group("market model")
    model.add_argument("--tokens", type=int, default=100, metavar="K",
                       help="instruments in the simulated universe (default 100)")
    model.add_argument("--mode", choices=MODES, default="mixed",
                       help="packet mode of every instrument, or mixed (default)")
    model.add_argument("--seed", type=int, default=0, metavar="S",
                       help="random seed: same seed, same output (default 0)")
    model.add_argument("--instruments-csv", metavar="FILE.csv",
                       help="also write the universe as a Kite instruments dump")
    out = p.add_argument_group("capture output")
    out.add_argument("--out", metavar="FILE.cap", help="capture file to write")
    out.add_argument("--ticks", type=int, metavar="N", help="packets to write")
    out.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                     help="progress: a bar on a terminal, else a log line this often "
                          "(default %(default)s)")
    live = p.add_argument_group("live Kite-protocol server")
    live.add_argument("--listen", metavar="HOST:PORT",
                      help="serve the Kite ticker WebSocket protocol here (port 0: any free port)")
    live.add_argument("--rate", type=float, default=1000.0, metavar="TICKS_PER_S",
                      help="packets per second offered in total (default 1000)")
    live.add_argument("--duration", type=float, metavar="S",
                      help="close and exit 0 after this many seconds (default: until signalled)")
    live.add_argument("--record", metavar="FILE.cap",
                      help="capture of every message sent, to every connection, in order")
    live.add_argument("--postbacks", type=float, default=0.0, metavar="PER_S",
                      help="order postbacks per second (default 0)")
    live.add_argument("--postback-source", metavar="MODULE:FACTORY",
                      help="factory(instruments, seed) returning the postback source "
                           "(default: the built-in generator)")
    live.add_argument("--postbacks-to", choices=("first", "all"), default="first",
                      help="postbacks to the oldest live connection (default) or to all")
    live.add_argument("--expected-token", metavar="TOKEN",
                      help="accept only this access_token (others get HTTP 403)")
    live.add_argument("--max-connections", type=int, default=3, metavar="N",
                      help="connections per api_key (default 3, the broker's limit)")
    live.add_argument("--batch", type=int, default=100, metavar="N",
                      help="packets per binary message at most (default 100)")
    faults = p.add_argument_group("fault injection (per connection, timed from its handshake)")
    faults.add_argument("--drop-every", type=float, metavar="S",
                        help="abort each connection (no close frame) after S seconds")
    faults.add_argument("--stall-after", type=float, metavar="S",
                        help="stop sending anything (heartbeats too) after S seconds")
    faults.add_argument("--stall-for", type=float, metavar="S",
                        help="resume after stalling S seconds (default: stay stalled)")
    faults.add_argument("--malformed", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of data messages sent damaged (default 0)")
    faults.add_argument("--reject-token", action="store_true",
                        help="answer every handshake with HTTP 403 (an expired token)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ingestor.sim.market import Market, generate_capture

    if args.tokens < 1:
        raise UsageError("simulate: --tokens must be at least 1")
    if args.seed < 0:
        raise UsageError("simulate: --seed must be non-negative")
    if args.listen is not None:
        if args.out is not None or args.ticks is not None:
            raise UsageError("simulate: --listen serves live; it takes no --out or --ticks")
        return _serve(args) if args.broker == "kite" else _serve_angel(args)
    if args.broker == "angel":
        return _capture_angel(args)
    if args.out is None or args.ticks is None:
        raise UsageError("simulate: --out FILE.cap and --ticks N are required")
    if args.ticks < 0:
        raise UsageError("simulate: --ticks must be non-negative")
    market = Market(n_tokens=args.tokens, seed=args.seed)
    if args.instruments_csv:
        try:
            market.write_instruments_csv(args.instruments_csv)
        except OSError as exc:
            raise UsageError(f"simulate: cannot write {args.instruments_csv}: {exc.strerror}") from None
    from ingestor.progress import Progress

    t0 = time.perf_counter()
    try:
        with Progress(f"simulate {os.path.basename(args.out)}", args.ticks, unit="ticks",
                      every=args.progress_every) as shown:
            r = generate_capture(args.out, args.ticks, mode=args.mode, seed=args.seed,
                                 market=market, progress=lambda n: shown.update(n, n))
    except OSError as exc:
        raise UsageError(f"simulate: cannot write {args.out}: {exc.strerror}") from None
    dt = time.perf_counter() - t0
    print(f"simulate: wrote {args.out}: {r['packets']} ticks in {r['messages']} messages "
          f"({r['heartbeats']} heartbeats), {r['tokens']} instruments, mode {args.mode}, "
          f"seed {args.seed}, {r['sessions']} session(s), {r['bytes']} bytes in {dt:.2f} s")
    return 0


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"simulate: --listen must be HOST:PORT, not {value!r}")
    return host, int(port)


def _serve(args: argparse.Namespace) -> int:
    from ingestor.sim.server import Faults, SimServer, load_postback_source
    from ingestor.sim.market import Market

    host, port = _parse_listen(args.listen)
    if args.rate < 0 or args.postbacks < 0:
        raise UsageError("simulate: --rate and --postbacks must be non-negative")
    if args.duration is not None and args.duration < 0:
        raise UsageError("simulate: --duration must be non-negative")
    if args.max_connections < 1 or not 1 <= args.batch <= 65535:
        raise UsageError("simulate: --max-connections must be >= 1 and --batch in 1..65535")
    faults = Faults(drop_every=args.drop_every, stall_after=args.stall_after,
                    stall_for=args.stall_for, malformed=args.malformed,
                    reject_token=args.reject_token)
    try:
        faults.validate()
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    csv_path = args.instruments_csv
    if csv_path is None and args.record:
        csv_path = os.path.splitext(args.record)[0] + ".instruments.csv"
    market = Market(n_tokens=args.tokens, seed=args.seed)
    source = None
    if args.postback_source:
        try:
            source = load_postback_source(args.postback_source, market.instruments, args.seed)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise UsageError(f"simulate: --postback-source: {exc}") from None
    server = SimServer(host, port, market=market, rate=args.rate, seed=args.seed,
                       record=args.record, instruments_csv=csv_path, postbacks=args.postbacks,
                       postback_source=source, postbacks_to=args.postbacks_to, faults=faults,
                       expected_token=args.expected_token,
                       max_connections=args.max_connections, batch=args.batch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread / platform
                pass
        try:
            await server.start()
        except OSError as exc:
            await server.close()
            if exc.filename is not None and exc.filename in (csv_path, args.record):
                raise UsageError(f"simulate: cannot write {exc.filename}: {exc.strerror}") from None
            raise Failure(f"simulate: cannot listen on {args.listen}: "
                          f"{exc.strerror or exc}") from None
        print(f"listening on {server.url}", flush=True)
        await server.serve(args.duration, stop)

    t0 = time.perf_counter()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    dt = time.perf_counter() - t0
    s = server.stats
    print(f"simulate: served {s['ticks']} ticks in {s['binary_messages']} binary messages "
          f"({s['heartbeats']} heartbeats, {s['malformed']} malformed) and "
          f"{s['text_messages']} text messages ({s['postbacks']} postbacks) to "
          f"{s['connections']} connection(s) in {dt:.1f} s; rejected {s['rejected_403']} (403), "
          f"{s['rejected_429']} (429); {s['drops']} drop(s), {s['stalls']} stall(s)"
          + (f"; recorded {args.record}" if args.record else ""), flush=True)
    return 0


def _angel_market(args):
    from ingestor.sim.smartstream import AngelMarket

    market = AngelMarket(args.tokens, args.seed)
    if args.scrip_master:
        try:
            market.write_master(args.scrip_master)
        except OSError as exc:
            raise UsageError(f"simulate: cannot write {args.scrip_master}: {exc.strerror}") from None
    return market


def _angel_subs(market, mode: str) -> dict:
    names = {"ltp": ("ltp",), "quote": ("quote",), "full": ("snap_quote",),
             "mixed": ("ltp", "quote", "snap_quote", "depth")}.get(mode, ("snap_quote",))
    subs = {}
    for i, key in enumerate(market.keys):
        m = names[i % len(names)]
        subs[key] = "quote" if m == "depth" and key[0] != 1 else m
    return subs


def _capture_angel(args: argparse.Namespace) -> int:
    """``--broker angel --out FILE.cap --ticks N``: one SmartStream packet per record."""
    from ingestor.feed.capture import CaptureHeader, CaptureWriter

    if args.out is None or args.ticks is None:
        raise UsageError("simulate: --out FILE.cap and --ticks N are required")
    if args.ticks < 0:
        raise UsageError("simulate: --ticks must be non-negative")
    market = _angel_market(args)
    subs = list(_angel_subs(market, args.mode).items())
    header = CaptureHeader(broker="angel", extra={"source": "ingestor simulate",
                                                  "seed": args.seed})
    try:
        w = CaptureWriter(args.out, header)
    except OSError as exc:
        raise UsageError(f"simulate: cannot write {args.out}: {exc.strerror}") from None
    done = 0
    with contextlib.closing(w):
        while done < args.ticks:
            recv_ns = market.market.advance(2_000_000)
            for pkt in market.packets(subs, min(len(subs), args.ticks - done), recv_ns):
                w.write(pkt, 1, recv_ns)
                done += 1
    print(f"simulate: wrote {args.out}: {done} SmartStream packets, {len(subs)} instruments, "
          f"mode {args.mode}, seed {args.seed}")
    return 0


def _serve_angel(args: argparse.Namespace) -> int:
    """``--broker angel --listen HOST:PORT``: the SmartStream simulator server."""
    from ingestor.sim.smartstream import AngelSimServer

    host, port = _parse_listen(args.listen)
    if args.rate < 0 or (args.duration is not None and args.duration < 0):
        raise UsageError("simulate: --rate and --duration must be non-negative")
    server = AngelSimServer(host, port, market=_angel_market(args), rate=args.rate,
                            feed_token=args.expected_token, record=args.record)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await server.start()
        except OSError as exc:
            await server.close()
            raise Failure(f"simulate: cannot listen on {args.listen}: "
                          f"{exc.strerror or exc}") from None
        print(f"listening on {server.url}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), args.duration)
        except asyncio.TimeoutError:
            pass
        await server.close()

    asyncio.run(main())
    s = server.stats
    print(f"simulate: served {s['packets']} SmartStream packets to {s['connections']} "
          f"connection(s); rejected {s['rejected_401']} (401), {s['rejected_429']} (429)"
          + (f"; recorded {args.record}" if args.record else ""), flush=True)
    return 0
