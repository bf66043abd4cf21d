"""The core's build (debug or release) in the start-up log and the metrics.

The debug build ``make test`` leaves in a checkout is several times slower: ``ingestor run``
and ``ingestor replay`` say so in one WARNING line at start, and ``ingestor_build_info``
carries it as its ``core`` label.
"""

from __future__ import annotations

import logging
import subprocess

from daemon_harness import ingestor
from ingestor import DEBUG
from ingestor.build import core_build, warn_debug_build
from ingestor.metrics import Metrics


def test_core_build_label_in_metrics():
    assert core_build() == ("debug" if DEBUG else "release")
    text = Metrics().render().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("ingestor_build_info{"))
    assert f'core="{core_build()}"' in line


def test_warning_only_on_the_debug_build(caplog):
    caplog.set_level(logging.INFO)
    warn_debug_build("ingestor replay")
    warned = [r for r in caplog.records if "DEBUG build of the core" in r.getMessage()]
    assert len(warned) == (1 if DEBUG else 0)
    assert all(r.levelno == logging.WARNING for r in warned)


def test_replay_says_it_at_start_and_not_before_an_error(db, tmp_path):
    from ingestor.sim.market import generate_capture

    cap = tmp_path / "s.cap"
    generate_capture(cap, ticks=1_000, tokens=5, seed=1)
    r = subprocess.run(ingestor("replay", str(cap), "--dsn", db), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("ingestor replay on the DEBUG build of the core" in r.stderr) == bool(DEBUG)
    # an error at once is its one line, nothing else
    bad = subprocess.run(ingestor("replay", str(tmp_path / "none.cap"), "--dsn", db),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
