"""The files under ``deploy/``: the Grafana dashboard and the Prometheus config and alerts,
the systemd unit and the logrotate snippet.

The source of truth is the metrics contract of DESIGN.md, copied below: every ``aiolb_``
metric and every label these files use must be in it, so a renamed metric breaks this
test instead of a dashboard nobody looks at until an incident.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "aiolb-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
UNIT = DEPLOY / "systemd" / "aiolb.service"
LOGROTATE = DEPLOY / "logrotate" / "aiolb"

# DESIGN.md, "Metrics contract": metric | type | labels
#: DESIGN.md's metrics contract, and the rate-limit counters the filters issue asks the
#: dashboard to show
CONTRACT_TABLE = """
| `aiolb_requests_total` | counter | `listener`, `pool`, `upstream`, `method`, `code` |
| `aiolb_request_duration_seconds` | histogram | `pool` |
| `aiolb_upstream_up` | gauge (1/0: healthy and enabled) | `pool`, `upstream` |
| `aiolb_upstream_active_requests` | gauge | `pool`, `upstream` |
| `aiolb_upstream_connect_errors_total` | counter | `pool`, `upstream` |
| `aiolb_retries_total` | counter | `pool` |
| `aiolb_upstream_ejections_total` | counter | `pool`, `upstream` |
| `aiolb_health_checks_total` | counter | `pool`, `upstream`, `result` |
| `aiolb_client_connections` | gauge | `listener` |
| `aiolb_config_reloads_total` | counter | `result` |
| `aiolb_rate_limited_total` | counter | `route`, `filter` |
| `aiolb_rate_limit_store_errors_total` | counter | `route`, `filter` |
"""


def _contract() -> dict[str, tuple[str, frozenset[str]]]:
    metrics = {}
    for line in CONTRACT_TABLE.strip().splitlines():
        name, kind, labels = (cell.strip() for cell in line.strip("|").split("|"))
        metrics[name.strip("`")] = (
            kind.split()[0],
            frozenset(label.strip(" `") for label in labels.split(",")),
        )
    return metrics


CONTRACT = _contract()
HISTOGRAMS = {name for name, (kind, _) in CONTRACT.items() if kind == "histogram"}
#: labels Prometheus adds (target labels) or that a histogram series carries
EXTRA_LABELS = frozenset({"job", "instance", "le"})
ALL_LABELS = frozenset().union(*(labels for _, labels in CONTRACT.values())) | EXTRA_LABELS

METRIC = re.compile(r"\baiolb_[a-z_]+")
SELECTOR = re.compile(r"\b(aiolb_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def series_name(used: str) -> str:
    """The contract name behind a series name (``_bucket``/``_sum``/``_count`` of a
    histogram); unchanged for anything else."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = used.removesuffix(suffix)
        if base != used and base in HISTOGRAMS:
            return base
    return used


def check_expr(expr: str) -> list[str]:
    """Problems with one PromQL expression against the contract (empty: fine)."""
    problems = []
    for used in METRIC.findall(expr):
        name = series_name(used)
        if name not in CONTRACT:
            problems.append(f"{used}: not in the metrics contract")
        elif name in HISTOGRAMS and used == name:
            problems.append(f"{used}: a histogram has only _bucket, _sum and _count series")
    for used, matchers in SELECTOR.findall(expr):
        name = series_name(used)
        if name in CONTRACT:
            allowed = CONTRACT[name][1] | EXTRA_LABELS
            for label in MATCHER.findall(matchers):
                if label not in allowed:
                    problems.append(f"{used}{{{label}=...}}: {name} has no label {label!r}")
    for group in GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in ALL_LABELS:
                problems.append(f"grouping by {label!r}: no contract metric has that label")
    return problems


def test_contract_table_parsed() -> None:
    assert len(CONTRACT) == 12  # DESIGN.md's 10 and the two rate-limit counters
    assert sorted(HISTOGRAMS) == ["aiolb_request_duration_seconds"]
    assert CONTRACT["aiolb_requests_total"][1] == {
        "listener", "pool", "upstream", "method", "code"
    }


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(aiolb_requests_total[5m])", None),
        ("histogram_quantile(0.9, sum by (le) (rate(aiolb_request_duration_seconds_bucket[1m])))",
         None),
        ("rate(aiolb_request_total[5m])", "not in the metrics contract"),
        ("aiolb_upstream_up_count", "not in the metrics contract"),
        ("rate(aiolb_request_duration_seconds[5m])", "only _bucket"),
        ('aiolb_upstream_up{path="/x"}', "has no label 'path'"),
        ("sum by (client_ip) (aiolb_upstream_up)", "grouping by 'client_ip'"),
    ],
)
def test_expression_checker(expr: str, problem: str | None) -> None:
    """The checker itself catches what it is meant to catch."""
    problems = check_expr(expr)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


# -- Grafana ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including panels nested in collapsed rows, rows excluded."""
    found = []
    for panel in data["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def test_grafana_dashboard_is_importable() -> None:
    data = dashboard()
    assert data["title"] and data["uid"]
    assert data["schemaVersion"] >= 36
    inputs = {i["name"]: i for i in data["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert data["id"] is None  # importable into any Grafana
    rows = [p for p in data["panels"] if p.get("type") == "row"]
    ids = [p["id"] for p in rows + panels(data)]
    assert len(ids) == len(set(ids)), "panel ids are unique"


def test_every_grafana_panel_has_a_prometheus_target() -> None:
    data = dashboard()
    assert len(panels(data)) >= 10
    for panel in panels(data):
        where = f"panel {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", where
        targets = panel.get("targets") or []
        assert targets, f"{where} has no target"
        for target in targets:
            assert target.get("expr", "").strip(), f"{where}: empty expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", where
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where


def test_grafana_dashboard_uses_only_contract_metrics() -> None:
    data = dashboard()
    exprs = [t["expr"] for p in panels(data) for t in p["targets"]]
    exprs += [v["definition"] for v in data["templating"]["list"] if v.get("definition")]
    problems = {e: check_expr(e) for e in exprs}
    assert {e: p for e, p in problems.items() if p} == {}
    used = {series_name(m) for e in exprs for m in METRIC.findall(e)}
    assert used == set(CONTRACT), f"contract metrics without a panel: {set(CONTRACT) - used}"


def test_grafana_latency_uses_histogram_quantiles() -> None:
    exprs = [t["expr"] for p in panels(dashboard()) for t in p["targets"]]
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}," in e for e in quantiles), q
    for e in quantiles:
        assert "aiolb_request_duration_seconds_bucket" in e and "le" in e, e


# -- Prometheus ------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    assert isinstance(data, dict) and isinstance(data["groups"], list) and data["groups"]
    rules = []
    for group in data["groups"]:
        assert group["name"] and isinstance(group["rules"], list) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_have_the_prometheus_shape() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        where = rule.get("alert")
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", where)
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), where
        assert isinstance(rule["for"], str) and DURATION.match(rule["for"]), where
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, where
        assert rule["annotations"]["summary"].strip(), where


def test_alert_rules_use_only_contract_metrics() -> None:
    problems = {r["alert"]: check_expr(r["expr"]) for r in alert_rules()}
    assert {a: p for a, p in problems.items() if p} == {}


def compact(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def test_the_alerts_operators_expect_are_there() -> None:
    rules = alert_rules()
    by_expr = {compact(r["expr"]): r for r in rules}

    down = [r for e, r in by_expr.items() if "aiolb_upstream_up" in e and e.endswith("==0")
            and "by(pool,upstream)" in e]
    assert down and down[0]["for"] == "1m", "upstream down for 1m"
    assert "sum by (pool) (aiolb_upstream_up) == 0" in {r["expr"] for r in rules}, (
        "no healthy upstream in a pool"
    )
    assert any('code=~"5.."' in e and "by(pool)" in e for e in by_expr), "5xx ratio per pool"
    assert any('aiolb_config_reloads_total{result="failure"}' in e for e in by_expr), (
        "config reload failures"
    )


def test_prometheus_scrapes_the_admin_metrics() -> None:
    data = yaml.safe_load(PROMETHEUS.read_text())
    assert "alerts.yml" in data["rule_files"]
    jobs = {job["job_name"]: job for job in data["scrape_configs"]}
    job = jobs["aiolb"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["aiolb:9901"]


# -- systemd and logrotate ------------------------------------------------------------------


def unit_keys(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as ``{section: {key: [values in order]}}`` (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT_KEYS = unit_keys(UNIT.read_text())
SERVICE = {key: values[-1] for key, values in UNIT_KEYS["Service"].items()}


def test_systemd_unit_is_notify_with_reload_by_sighup() -> None:
    assert SERVICE["Type"] == "notify"  # proxy/runtime/notify.py sends READY=1
    assert SERVICE["ExecStart"].endswith("/aiolb run")
    assert UNIT_KEYS["Service"]["ExecReload"] == [
        SERVICE["ExecStart"].replace(" run", " check"),  # a bad file fails the reload
        # the shell's builtin kill: /bin/kill (procps) is missing on minimal systems
        "/bin/sh -c 'kill -HUP ${MAINPID}'",
    ]
    assert SERVICE["ExecStartPre"].endswith("/aiolb check")
    assert SERVICE["KillMode"] == "mixed"  # the supervisor drains its workers
    # longer than the default shutdown_timeout (30s), so a drain is not cut short
    assert int(SERVICE["TimeoutStopSec"].removesuffix("s")) > 30
    assert UNIT_KEYS["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in UNIT_KEYS["Unit"]["After"][0]


def test_systemd_unit_is_sandboxed() -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",  # AF_UNIX: workers, notify
        "SystemCallFilter": "@system-service",
        "User": "aiolb",
    }
    assert {key: SERVICE.get(key) for key in expected} == expected
    # with ProtectSystem=strict, what it writes is in the directories systemd makes
    assert (SERVICE["RuntimeDirectory"], SERVICE["LogsDirectory"]) == ("aiolb", "aiolb")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd; .ci/run installs it); "
    "the unit's keys are still checked by the tests above",
)
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify wants the programs to exist: aiolb stands in as true
    unit = tmp_path / "aiolb.service"
    unit.write_text(re.sub(r"/\S+/aiolb ", f"{shutil.which('true')} ", UNIT.read_text()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # unknown keys and bad values are only warnings: any output is a failure here
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_logrotate_reopens_the_log_of_the_units_pid_file() -> None:
    text = LOGROTATE.read_text()
    path = re.search(r"^(/\S+) \{$", text, re.M)
    assert path is not None and path.group(1).startswith(f"/var/log/{SERVICE['LogsDirectory']}/")
    postrotate = text.split("postrotate", 1)[1].split("endscript", 1)[0]
    pid_file = f"/run/{SERVICE['RuntimeDirectory']}/aiolb.pid"
    # SIGUSR1: reopen the access log (nginx's signal); the pid of aiolb's pid_file
    assert f'kill -USR1 "$(cat {pid_file})"' in postrotate
    assert f"pid_file: {pid_file}" in text and f"pid_file: {pid_file}" in UNIT.read_text()
    assert re.search(r"^\s+create 0640 aiolb aiolb$", text, re.M)  # the unit's user
