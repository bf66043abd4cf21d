"""``ingestor bench --json / --compare / --png / --results``: results a script can read, the
change against an earlier run, a chart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ingestor(*args, code: str = "") -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``code`` runs first (to hide a module)."""
    prog = f"{code}\nimport sys\nfrom ingestor.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True,
                          timeout=300)


def _results(rate_ltp: float, rate_full: float, core: str = "release") -> dict:
    return {"format": 1, "started": "2026-11-28T10:00:00+00:00", "quick": False,
            "machine": {"cpu": "Test CPU", "cores": 2, "usable_cores": 2, "core": core,
                        "python": "3.11", "ingestor": "0.1.0", "arch": "x86_64", "os": "Linux"},
            "stages": {"decode": {"title": "decode", "seconds": 1.0, "rows": [
                {"mode": "ltp", "batch pkt/s": rate_ltp, "twin pkt/s": "n/a"},
                {"mode": "full", "batch pkt/s": rate_full, "twin pkt/s": 1000.0}]},
                "copy": {"title": "copy", "seconds": 1.0, "rows": [
                    {"bench": "copy_encode", "case": "ticks", "impl": "core",
                     "rows_per_s": 4e6, "vs_psycopg": 20.0}]}}}


def test_json_results_carry_machine_build_and_rows(tmp_path):
    out = tmp_path / "run.json"
    r = _ingestor("bench", "--only", "decode", "--quick", "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["format"] == 1 and data["quick"] is True
    m = data["machine"]
    assert m["core"] in ("debug", "release") and m["usable_cores"] >= 1 and m["cpu"]
    rows = data["stages"]["decode"]["rows"]
    assert {r["mode"] for r in rows} >= {"ltp", "full"}
    assert all(isinstance(r["batch pkt/s"], float) and r["batch pkt/s"] > 0 for r in rows)


def test_decode_rows_of_both_brokers_without_the_official_clients(tmp_path):
    """The SmartStream rows (every mode) beside Kite's; without smartapi-python (or
    kiteconnect) the official client's figures say so, and the rest is measured."""
    out = tmp_path / "run.json"
    r = _ingestor("bench", "--only", "decode", "--quick", "--json", str(out),
                  code="import sys; sys.modules['SmartApi'] = None; "
                       "sys.modules['kiteconnect'] = None")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["stages"]["decode"]["rows"]
    angel = [r for r in rows if r["mode"].startswith("angel/")]
    assert [r["mode"] for r in angel] == ["angel/ltp", "angel/quote", "angel/snap_quote",
                                          "angel/depth"]
    for row in angel:
        assert row["smartapi pkt/s"] == row["batch / smartapi"] == "not installed", row
        assert all(isinstance(row[c], float) and row[c] > 0
                   for c in ("batch pkt/s", "batch in-cache pkt/s", "feed() pkt/s", "twin pkt/s"))
    assert all(r["kiteconnect pkt/s"] == "n/a" for r in rows if r not in angel)
    assert "not installed" in r.stdout


def test_compare_prints_each_figure_with_its_ratio(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(_results(1e6, 4e5)))
    new.write_text(json.dumps(_results(2e6, 2e5, core="debug")))
    r = _ingestor("bench", "--results", str(new), "--compare", str(old))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ltp = next(ln for ln in lines if ln.startswith("decode") and "ltp" in ln and "batch" in ln)
    assert ltp.split()[-1] == "2.00", ltp                        # twice the rate now
    full = next(ln for ln in lines if ln.startswith("decode") and "full" in ln and "batch" in ln)
    assert full.split()[-1] == "0.50", full
    assert any("copy_encode / ticks / core" in ln and ln.split()[-1] == "1.00" for ln in lines)
    assert not any("twin" in ln and "ltp" in ln for ln in lines)   # "n/a" is no figure
    assert "differ in machine or core build" in r.stdout          # debug against release


def test_png_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")  # in the [test] extra: this runs wherever the tests do
    res, png = tmp_path / "r.json", tmp_path / "chart.png"
    res.write_text(json.dumps(_results(1e6, 4e5)))
    r = _ingestor("bench", "--results", str(res), "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "2 stage(s)" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_how_to_install(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_results(1e6, 4e5)))
    r = _ingestor("bench", "--results", str(res), "--png", str(tmp_path / "c.png"),
                  code="import sys; sys.modules['matplotlib'] = None")
    assert r.returncode == 2
    assert "pip install 'ingestor[bench]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"format": 1}',
                                     '{"format": 1, "stages": {"x": {"rows": [1]}}}',
                                     '{"format": 9, "stages": {}}', "[" * 100_000])
def test_bad_results_file_is_one_line_exit_2(tmp_path, content):
    bad, good = tmp_path / "bad.json", tmp_path / "good.json"
    bad.write_text(content)
    good.write_text(json.dumps(_results(1e6, 4e5)))
    r = _ingestor("bench", "--results", str(good), "--compare", str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "not a bench results file" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_results_alone_or_with_a_run_option_is_a_usage_error(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps(_results(1e6, 4e5)))
    assert _ingestor("bench", "--results", str(res)).returncode == 2
    assert _ingestor("bench", "--results", str(res), "--compare", str(res),
                     "--quick").returncode == 2


@pytest.mark.slow
def test_bench_runs_from_an_installed_package(tmp_path):
    """``ingestor bench`` from the package installed apart from the checkout (``pip install
    --target``, built from a copy of the sources) and run from another folder: the benchmarks
    are in the package, nothing comes from the source tree."""
    copy = tmp_path / "sources"
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns(
        "*.so", "*.c", "*.html", "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    site = tmp_path / "site"
    # the debug build: it compiles in a fraction of the release build's time
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-index", "--no-build-isolation", "--target", str(site), str(copy)],
                       capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, INGESTOR_DEBUG="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (site / "ingestor" / "benchmarks" / "common.py").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkout = str(ROOT / "src")
    prog = ("import sys\nfrom ingestor.cli import main\nrc = main(sys.argv[1:])\nimport ingestor\n"
            f"print('FROM-CHECKOUT', sorted(n for n, m in list(sys.modules.items()) if "
            f"(getattr(m, '__file__', None) or '').startswith({checkout!r})))\n"
            "print('PACKAGE', ingestor.__file__)\nsys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", prog, "bench", "--quick", "--only", "decode",
                        "--json", "out.json"], cwd=elsewhere, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(site)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "FROM-CHECKOUT []" in r.stdout, r.stdout
    package = next(ln for ln in r.stdout.splitlines() if ln.startswith("PACKAGE "))
    assert package.split(" ", 1)[1].startswith(str(site / "ingestor")), package
    data = json.loads((elsewhere / "out.json").read_text())
    assert data["machine"]["core"] == "debug"           # the build just installed
    rows = data["stages"]["decode"]["rows"]
    assert {r["mode"] for r in rows} >= {"ltp", "full"}
    assert all(isinstance(r["batch pkt/s"], float) and r["batch pkt/s"] > 0 for r in rows)
