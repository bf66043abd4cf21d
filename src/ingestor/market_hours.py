"""Trading sessions of the Indian exchanges: when a feed is expected to deliver ticks.

``ingestor status`` and the daemon's ``ingestor_market_open{session}`` metric (which the
alerting rules in ``deploy/prometheus`` use) share this one definition, so "no tick for a
while" is an alarm exactly when a session is open: a trading day of the exchange's holiday
calendar, between its opening and closing time in India Standard Time.

Holidays come from the ``holidays`` package's financial calendars (``XNSE``: the National
Stock Exchange of India's trading holidays, published yearly by the exchange; ``XBOM`` for
BSE is the same list).  Weekends are closed.  The segments' hours differ and are
configurable:

=========== ================================ =============
session     exchanges (``tick_data.exchange``) default hours
=========== ================================ =============
equity      NSE, NFO, BSE, BFO                09:15-15:30
currency    CDS, BCD, MCXSX                   09:00-17:00
commodity   MCX, NCO                          09:00-23:30
=========== ================================ =============

Override with ``NAME=HH:MM-HH:MM`` items: in the configuration file's ``[sessions]`` table
(``equity = "09:15-15:30"``; ``ingestor run`` and ``ingestor status --config`` read it), the
``INGESTOR_SESSIONS`` environment variable as a comma-separated list (the daemon and status
both), or ``ingestor status --session``, each over the one before; optionally with a
calendar: ``commodity=09:00-23:55@XNSE`` (US daylight saving
moves MCX's close), ``equity=09:15-15:30@none`` (weekdays only).  Special sessions the
exchanges announce at short notice (Muhurat trading on Diwali, a Saturday mock session)
are not in any calendar: on such a day the status command's ``--at`` and the alert's
silence are the operator's call.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from dataclasses import dataclass, replace
from typing import Iterable, Mapping
from zoneinfo import ZoneInfo

from ingestor.errors import ConfigError

#: The exchanges' time zone: sessions, "today" and displayed times.
IST = ZoneInfo("Asia/Kolkata")

#: The environment variable with session overrides (comma-separated ``NAME=HH:MM-HH:MM``).
ENV = "INGESTOR_SESSIONS"

#: Calendar names that mean "no holidays, weekdays only".
_NO_CALENDAR = ("", "none")


class SessionError(ConfigError):
    """A session override that does not parse (the message names the item): exit status 2."""


@dataclass(frozen=True)
class Session:
    """One segment's trading hours.

    Attributes
    ----------
    name : str
        ``equity``, ``currency``, ``commodity`` (or a new name given with its exchanges).
    exchanges : tuple of str
        The ``exchange`` values of ``tick_data`` this session covers.
    opens, closes : datetime.time
        Local (IST) opening and closing time; ``opens < closes`` (no session crosses
        midnight).
    calendar : str
        A financial market code of the ``holidays`` package (``XNSE``, ``XBOM``), or
        ``none`` for weekdays only.
    """

    name: str
    exchanges: tuple[str, ...]
    opens: dt.time
    closes: dt.time
    calendar: str = "XNSE"

    def holiday(self, day: dt.date) -> str | None:
        """The holiday's name if ``day`` is a weekday the exchange is closed, else None."""
        if self.calendar.lower() in _NO_CALENDAR:
            return None
        return _holidays(self.calendar, day.year).get(day)

    def is_trading_day(self, day: dt.date) -> bool:
        return day.weekday() < 5 and self.holiday(day) is None

    def bounds(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """Opening and closing instants of ``day`` (timezone-aware, IST)."""
        return (dt.datetime.combine(day, self.opens, IST),
                dt.datetime.combine(day, self.closes, IST))

    def open_since(self, at: dt.datetime) -> float | None:
        """Seconds since today's opening if the session is open at ``at``, else None."""
        local = at.astimezone(IST)
        if not self.is_trading_day(local.date()):
            return None
        start, end = self.bounds(local.date())
        if start <= local < end:
            return (local - start).total_seconds()
        return None

    def is_open(self, at: dt.datetime) -> bool:
        return self.open_since(at) is not None

    def describe(self) -> str:
        cal = "weekdays" if self.calendar.lower() in _NO_CALENDAR else self.calendar
        return (f"{self.name} ({', '.join(self.exchanges)}) {self.opens:%H:%M}-"
                f"{self.closes:%H:%M} IST, {cal}")


DEFAULT_SESSIONS: tuple[Session, ...] = (
    Session("equity", ("NSE", "NFO", "BSE", "BFO"), dt.time(9, 15), dt.time(15, 30)),
    Session("currency", ("CDS", "BCD", "MCXSX"), dt.time(9, 0), dt.time(17, 0)),
    Session("commodity", ("MCX", "NCO"), dt.time(9, 0), dt.time(23, 30)),
)

_ITEM = re.compile(r"^\s*([a-z][a-z0-9_-]{0,31})\s*=\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})"
                   r"\s*(?:@\s*([A-Za-z]{1,8}))?\s*$")


@functools.lru_cache(maxsize=64)
def _holidays(calendar: str, year: int):
    import holidays

    try:
        return holidays.financial_holidays(calendar.upper(), years=year)
    except NotImplementedError:
        raise SessionError(f"unknown holiday calendar {calendar!r} (e.g. XNSE, XBOM, or none)") \
            from None


def parse(items: Iterable[str], base: Iterable[Session] = DEFAULT_SESSIONS) -> tuple[Session, ...]:
    """``base`` with the overrides ``NAME=HH:MM-HH:MM[@CALENDAR]`` applied.

    Raises
    ------
    SessionError
        An item that does not parse, a time out of range, an empty session or an unknown
        session name (the known ones are listed).
    """
    sessions = {s.name: s for s in base}
    for item in items:
        if not item.strip():
            continue
        m = _ITEM.match(item)
        if not m:
            raise SessionError(f"session {item.strip()[:60]!r}: want NAME=HH:MM-HH:MM[@CALENDAR]")
        name, h1, m1, h2, m2, cal = m.groups()
        if name not in sessions:
            raise SessionError(f"session {name!r}: unknown (one of {', '.join(sessions)})")
        try:
            opens, closes = dt.time(int(h1), int(m1)), dt.time(int(h2), int(m2))
        except ValueError:
            raise SessionError(f"session {name!r}: times must be 00:00 to 23:59") from None
        if opens >= closes:
            raise SessionError(f"session {name!r}: opens at {opens:%H:%M}, not before it "
                               f"closes ({closes:%H:%M})")
        s = replace(sessions[name], opens=opens, closes=closes)
        if cal is not None:
            s = replace(s, calendar=cal)
            s.holiday(dt.date(2000, 1, 3))  # an unknown calendar fails here, not at 09:15
        sessions[name] = s
    return tuple(sessions.values())


def check_item(name: str, value: str) -> None:
    """One ``[sessions]`` entry of a configuration file (``name = "HH:MM-HH:MM[@CAL]"``):
    :class:`SessionError` saying what is wrong, without the ``session 'name':`` prefix."""
    if not isinstance(value, str) or "=" in value or "," in value:
        raise SessionError("want \"HH:MM-HH:MM\" or \"HH:MM-HH:MM@CALENDAR\"")
    try:
        parse([f"{name}={value}"])
    except SessionError as exc:
        raise SessionError(re.sub(r"^session '[^']*': ", "", str(exc))) from None


def from_env(environ: Mapping[str, str] | None = None, extra: Iterable[str] = (),
             configured: Mapping[str, str] | None = None) -> tuple[Session, ...]:
    """The defaults, then ``configured`` (a configuration file's ``[sessions]``, checked at its
    load), then ``INGESTOR_SESSIONS``, then ``extra`` (command-line items)."""
    env = os.environ if environ is None else environ
    try:
        base = parse([f"{k}={v}" for k, v in (configured or {}).items()])
    except SessionError as exc:
        raise SessionError(f"{exc} (in the configuration's [sessions])") from None
    items = [*env.get(ENV, "").split(","), *extra]
    try:
        return parse(items, base)
    except SessionError as exc:
        where = "" if not env.get(ENV) else f" (with {ENV} set)"
        raise SessionError(f"{exc}{where}") from None


def session_of(exchange: str, sessions: Iterable[Session]) -> Session | None:
    """The session covering ``exchange`` (None: not a known exchange, never expected)."""
    for s in sessions:
        if exchange in s.exchanges:
            return s
    return None


def day_start(at: dt.datetime) -> dt.datetime:
    """Midnight IST of ``at``'s day: where "today" starts for the exchanges."""
    local = at.astimezone(IST)
    return dt.datetime.combine(local.date(), dt.time(0), IST)
