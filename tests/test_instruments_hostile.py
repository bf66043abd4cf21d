"""Hostile instruments dumps: every bad cell is refused at once with one line naming the line
and the column (exit 2), never a hang, a traceback, a database error or a silent truncation."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEADER = ("instrument_token,exchange_token,tradingsymbol,name,last_price,expiry,strike,"
          "tick_size,lot_size,instrument_type,segment,exchange")
GOOD = "3813889,14898,CENTRALBK-BE,CENTRAL BANK OF INDIA,0.0,,0.0,0.05,1,EQ,NSE,NSE"


def row(**cells) -> str:
    cols = HEADER.split(",")
    vals = dict(zip(cols, GOOD.split(",")))
    vals.update(cells)
    return ",".join(vals[c] for c in cols)


CASES = [
    ("huge exponent token", row(instrument_token="1e99999999"), "instrument_token"),
    ("huge exponent exchange token", row(exchange_token="1e99999999"), "exchange_token"),
    ("huge exponent lot", row(lot_size="1e99999999"), "lot_size"),
    ("token 2^32", row(instrument_token=str(1 << 32)), "instrument_token"),
    ("token 0", row(instrument_token="0"), "instrument_token"),
    ("NUL in symbol", row(tradingsymbol="AB\x00C"), "tradingsymbol"),
    ("tick size 1e20", row(tick_size="1e20"), "tick_size"),
    ("strike 1e400000", row(strike="1e400000"), "strike"),
    ("tick size too precise", row(tick_size="0.000000001"), "tick_size"),
    ("100 KB symbol", row(tradingsymbol="X" * 100_000), "tradingsymbol"),
    ("date with garbage", row(expiry="2025-01-28garbage"), "expiry"),
]


def load(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "dump.csv"
    path.write_text(text, encoding="utf-8")
    # no database is needed to refuse a file: validation comes before connecting
    return subprocess.run([sys.executable, "-m", "ingestor", "instruments", "load", str(path),
                           "--dsn", "host=127.0.0.1 port=1 user=nobody dbname=none"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("what,line,column", CASES, ids=[c[0] for c in CASES])
def test_bad_cell_is_refused_with_one_line(tmp_path, what, line, column):
    r = load(tmp_path, f"{HEADER}\n{GOOD}\n{line}\n")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert ":3:" in lines[0] and column in lines[0], lines[0]
    assert len(lines[0]) < 400  # a 100 KB cell is not echoed


def test_duplicated_header_column_is_refused(tmp_path):
    r = load(tmp_path, HEADER + ",exchange\n" + GOOD + ",BSE\n")
    assert r.returncode == 2, r.stderr
    assert "exchange" in r.stderr and "more than once" in r.stderr


def test_timestamp_expiry_keeps_its_date(tmp_path):
    from ingestor.store.instruments import read_csv

    path = tmp_path / "dump.csv"
    path.write_text(f"{HEADER}\n{row(expiry='2025-01-28T15:30:00')}\n")
    (r,) = read_csv(path)
    assert str(r.expiry_date) == "2025-01-28"
