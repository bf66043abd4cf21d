"""Progress of long commands (``replay``, ``simulate --out``): a bar on a terminal, log lines off it.

On a terminal, a tqdm bar on stderr shows the share done, the rate and the time left; when
stderr is not a terminal (a pipe, a log file, the journal) an INFO log line every ``every``
seconds says the same in plain text, without escape sequences.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

# tqdm is imported where a bar or a line is made: a replay without either (--no-progress,
# a short run) does not pay its import at start-up

log = logging.getLogger("ingestor.progress")

#: seconds between progress log lines when stderr is not a terminal
EVERY = 10.0


class Progress:
    """How far ``what`` is through ``total`` units (bytes of a capture, ticks to write).

    Parameters
    ----------
    what
        The job's name, first on every line (``replay mixed.cap``).
    total, start
        The units of the whole job, and those done before it began (a resumed replay).
    unit
        The unit of ``total`` (``B``: shown scaled, kB, MB).
    mode
        ``"bar"``, ``"log"`` or ``"off"``; None: a bar when stderr is a terminal, else log lines.
    every
        Seconds between log lines in ``"log"`` mode.
    """

    def __init__(self, what: str, total: int, *, unit: str = "B", start: int = 0,
                 mode: str | None = None, every: float = EVERY):
        if mode is None:
            mode = "bar" if sys.stderr.isatty() else "log"
        self.what, self.total, self.unit, self.mode, self.every = what, total, unit, mode, every
        self.start = self.done = start
        self.count = 0
        self.note = ""
        self.t0 = time.monotonic()
        self._next = self.t0 + every
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=start, unit=unit, unit_scale=True,
                             unit_divisor=1024 if unit == "B" else 1000, desc=what,
                             file=sys.stderr, dynamic_ncols=True, leave=False)
            # log lines go above the bar instead of through it
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, done: int, count: int | None = None, note: str | None = None) -> None:
        """``done`` units of ``total`` so far; ``count`` of the rated thing (ticks); ``note``:
        the rest of the line (what is committed)."""
        self.done = done
        if count is not None:
            self.count = count
        if note is not None:
            self.note = note
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)
        elif self.mode == "log":
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.every
                log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress as one plain line: share done, rate, time left, the note."""
        from tqdm import tqdm

        elapsed = (now or time.monotonic()) - self.t0
        part = (self.done - self.start) / max(1, self.total - self.start)
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval(elapsed * (1 - part) / part) if part > 0 else "?"
        out = f"{self.what}: {self.done / max(1, self.total):.1%}"
        if self.unit == "B":
            out += f" of {tqdm.format_sizeof(self.total, 'B', 1024)}"
        out += f", {rate:,.0f} ticks/s, ETA {eta}"
        return out + (f"; {self.note}" if self.note else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
