"""What ``deploy/`` ships is checked against the real thing.

* The Grafana dashboard and the Prometheus alerting rules name only metrics (and labels) a
  running daemon exposes: a daemon is started against the bundled simulator and its
  ``/metrics`` read; a renamed metric fails here, not on an operator's blank panel.
* The rules pass ``promtool check rules``, their unit tests (``alerts.test.yml``) pass
  ``promtool test rules``, and the example ``prometheus.yml`` passes ``promtool check config``.
  promtool comes with Debian's ``prometheus`` package, which ``.ci/run`` installs.
* The systemd unit template passes ``systemd-analyze verify`` for each kind of instance where
  systemd is there, and keeps the settings the README promises.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from daemon_harness import Daemon, Simulator, count_ticks, free_port, load_instruments, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ingestor.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
#: the one unit template of every process: ingestor@daemon, ingestor@feed, ingestor@writer
UNIT = DEPLOY / "systemd" / "ingestor@.service"
ROLE_CONFIGS = {"feed": DEPLOY / "log" / "feed.toml", "writer": DEPLOY / "log" / "writer.toml"}

#: series Prometheus makes itself, not the daemon
PROMETHEUS_OWN = {"up"}
#: labels the scrape adds, and the histogram bucket label
SCRAPE_LABELS = {"instance", "job", "le"}

_SELECTOR = re.compile(r"\b((?:ingestor_|up\b)[a-z0-9_]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out.extend(t["expr"] for t in p.get("targets", []))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["definition"].removeprefix("label_values(").rsplit(",", 1)[0])
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def references(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """The metric selectors of a PromQL expression (name, label names matched) and the label
    names it groups or joins by."""
    sels = [(m.group(1), set(_MATCHER.findall(m.group(2) or ""))) for m in _SELECTOR.finditer(expr)]
    grouping = {x.strip() for g in _GROUPING.findall(expr) for x in g.split(",") if x.strip()}
    return sels, grouping


def test_dashboard_and_alerts_name_only_what_a_daemon_exposes(tmp_path, db):
    from prometheus_client.parser import text_string_to_metric_families

    sim = Simulator(tmp_path, tokens=10, rate=500)
    load_instruments(db, sim.csv)
    port = free_port()
    d = Daemon(tmp_path, db, sim.url, metrics_port=port)
    try:
        wait_for(lambda: count_ticks(db) > 100, timeout=60, what="100 ticks written")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        sim.stop()
        assert d.terminate() == 0, d.output()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    all_labels = set().union(*labels.values()) | SCRAPE_LABELS

    exprs = [("dashboard", e) for e in dashboard_exprs()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    used = set()
    for where, expr in exprs:
        sels, grouping = references(expr)
        assert sels, f"{where}: no metric in {expr!r}"
        for name, matched in sels:
            if name in PROMETHEUS_OWN:
                continue
            assert name in labels, f"{where}: {name} is not exposed by the daemon ({expr!r})"
            unknown = matched - labels[name] - SCRAPE_LABELS
            assert not unknown, f"{where}: {name} has no label {unknown} ({expr!r})"
            used.add(name)
        assert grouping <= all_labels, f"{where}: grouping by unknown {grouping - all_labels}"
    # what the issue asks the dashboard to show is there
    dash = {n for e in dashboard_exprs() for n, _ in references(e)[0]}
    for name in ("ingestor_ticks_decoded_total", "ingestor_ticks_written_total",
                 "ingestor_tick_to_commit_seconds_bucket", "ingestor_spool_bytes",
                 "ingestor_feed_connected", "ingestor_feed_reconnects_total",
                 "ingestor_database_up", "ingestor_dead_letters_total",
                 "ingestor_loop_lag_seconds", "ingestor_market_open"):
        assert name in dash, name
    # and the market calendar's series is there for the market-hours alerts
    assert 'ingestor_market_open{session="equity"}' in text


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "instance"}


def test_alert_rules_are_complete():
    rules = {r["alert"]: r for r in alert_rules()}
    for name in ("IngestorFeedDown", "IngestorNoTicks", "IngestorFeedSilent", "IngestorSpoolAlarm",
                 "IngestorDeadLetters", "IngestorDatabaseDown", "IngestorLoopLag"):
        assert name in rules, name
    for r in rules.values():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    # the market-hours rules use the daemon's calendar series
    for name in ("IngestorNoTicks", "IngestorFeedSilent"):
        assert "ingestor_market_open" in rules[name]["expr"], name


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


@pytest.mark.parametrize("args", [("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts.test.yml"),
                                  ("check", "config", "prometheus.yml")])
def test_promtool(args):
    r = subprocess.run([_promtool(), *args], cwd=DEPLOY / "prometheus", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def drop_in(instance: str) -> Path:
    return UNIT.with_name(f"ingestor@{instance}.service.d") / "credentials.conf"


def test_one_unit_template_serves_every_process():
    """One template: the instance name picks the config and the state directory (the config
    says daemon, feed or writer), and every instance keeps the promises below."""
    from ingestor.config import Config

    assert sorted(p.name for p in UNIT.parent.glob("*.service")) == ["ingestor@.service"]
    u = unit_settings(UNIT.read_text())
    stop = float(u["TimeoutStopSec"][0].removesuffix("s"))
    assert stop > Config().shutdown_timeout           # the process drains before the SIGKILL
    assert u["KillSignal"] == ["SIGTERM"] and u["Restart"] == ["on-failure"]
    assert u["RestartPreventExitStatus"] == ["2"]     # a bad setting is not retried
    assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
    # readiness from the process itself (tests/test_sdnotify.py, and the roles':
    # test_jetstream_lease.py): only the main process speaks
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    # the process pings at half the interval from a loop that turns every 0.1 s
    assert float(u["WatchdogSec"][0].removesuffix("s")) >= 10
    assert u["ExecStart"][0].endswith("run --config /etc/ingestor/%i.toml")
    assert "--role" not in u["ExecStart"][0]          # the role is the config's log.role
    assert u["StateDirectory"] == ["ingestor/%i"]     # one spool per instance
    assert u["WorkingDirectory"] == ["/var/lib/ingestor/%i"]
    assert u["DefaultInstance"] == ["daemon"]
    # the database password for every instance; the broker's credentials only where a
    # process connects to the broker (the one-process daemon, a feed), by drop-in
    assert u["Environment"] == ["PGPASSFILE=%d/pgpass"]
    assert {c.split(":")[0] for c in u["LoadCredential"]} == {"pgpass"}
    for instance in ("daemon", "feed"):
        d = unit_settings(drop_in(instance).read_text())
        assert d["LoadCredential"] == ["kite.env:/etc/ingestor/kite.env"], instance
    assert not drop_in("writer").exists()
    # no secret in the unit or a drop-in: only placeholders ("access_token=...")
    for path in (UNIT, drop_in("daemon"), drop_in("feed")):
        assert not re.search(r"(?i)(api_key|access_token|password)\s*=\s*(?!\.\.\.)\S",
                             path.read_text()), path
    # the feed example's credentials file is where the feed instance's drop-in puts it
    assert 'credentials_file = "/run/credentials/ingestor@feed.service/kite.env"' in \
        ROLE_CONFIGS["feed"].read_text()


def test_unit_template_instances_pass_systemd_analyze(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify needs ExecStart's program to exist: this environment's console script
    exe = shutil.which("ingestor") or str(Path(sys.executable).with_name("ingestor"))
    template = UNIT.read_text().replace("/usr/local/bin/ingestor", exe)
    for instance in ("daemon", "feed", "writer", "writer-b"):
        unit = tmp_path / f"ingestor@{instance}.service"
        # the instance's drop-in, as systemd merges it (a section may appear twice)
        extra = drop_in(instance).read_text() if drop_in(instance).exists() else ""
        unit.write_text(template + "\n" + extra)
        r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, instance + ": " + r.stdout + r.stderr


def test_role_example_configs_load_and_agree():
    """deploy/log's examples are valid settings, name their roles, and agree on what every
    process of one log must share (stream, subjects, lease timing)."""
    from ingestor import config as config_mod

    cfgs = {}
    for role, path in ROLE_CONFIGS.items():
        cfg = config_mod.load(str(path))
        config_mod.validate(cfg)
        assert cfg.log.role == role and cfg.log.enabled
        cfgs[role] = cfg.log
    f, w = cfgs["feed"], cfgs["writer"]
    for key in ("servers", "stream", "subject_prefix", "replicas", "duplicate_window",
                "lease_ttl", "lease_renew"):
        assert getattr(f, key) == getattr(w, key), key
    assert f.feed_lease and w.publish_candles
    assert "max_payload" in (DEPLOY / "log" / "nats-server.conf").read_text()
