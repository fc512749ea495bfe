"""docs/alert-rules.yml and docs/grafana-dashboard.json: valid, and only about metrics that exist.

promtool checks the rules, unit-tests that the key alerts fire, and parses every dashboard query (wrapped
as recording rules, Grafana's variables substituted).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DOCS = Path(__file__).resolve().parents[3] / "docs"
RULES = DOCS / "alert-rules.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"

# The metric contract the server exports (gateway/metrics.py); the watchdog's two come from its state.
CONTRACT = {"mlx_gateway_" + name for name in (
    "http_requests_total", "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds",
    "e2e_request_latency_seconds", "request_queue_time_seconds", "num_requests_running",
    "num_requests_waiting", "models_loaded", "models_available", "requests_rejected_total",
    "requests_cancelled_total",
    "engine_restarts_total", "engine_up", "ready", "engine_stalled", "draining", "model_load_failures_total",
    "memory_active_bytes", "memory_budget_bytes", "watchdog_restarts_last_hour", "watchdog_gave_up",
)}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def metric_names(text: str) -> set[str]:
    names = set(re.findall(r"\bmlx_gateway_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if "seconds_" in n else n for n in names}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def queries() -> list[str]:
    d = dashboard()
    found = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    return found + [a["expr"] for a in d["annotations"]["list"] if "expr" in a]


def test_promtool_check_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 13 rules found" in done.stdout


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="mlx-gateway", instance="mac:11435"}}'
        values: '1 1 0 0 0 0'
      - series: 'mlx_gateway_watchdog_gave_up{{job="mlx-gateway", instance="mac:11435"}}'
        values: '0 0 1 1 1 1'
      - series: 'mlx_gateway_watchdog_restarts_last_hour{{job="mlx-gateway", instance="mac:11435"}}'
        values: '0 1 2 3 4 5'
    alert_rule_test:
      - eval_time: 1m
        alertname: MLXGatewayDown
        exp_alerts: []
      - eval_time: 5m
        alertname: MLXGatewayDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: mlx-gateway, instance: "mac:11435"}}
            exp_annotations:
              summary: "mlx-gateway on mac:11435 does not answer /metrics"
              description: "Prometheus cannot scrape the server for 2 minutes. Either it is \\
                restarting (watchdog or systemd), or the restart authority gave up. \\
                Run `mlx-gateway status` on the host."
              runbook: "docs/operations.md#when-the-watchdog-gives-up"
      - eval_time: 2m
        alertname: MLXGatewayWatchdogGaveUp
        exp_alerts: []
      - eval_time: 4m
        alertname: MLXGatewayWatchdogGaveUp
        exp_alerts:
          - exp_labels: {{severity: critical, job: mlx-gateway, instance: "mac:11435"}}
            exp_annotations:
              summary: "the watchdog on mac:11435 spent its restart budget and stopped restarting"
              description: "The server crashed or hung too often in the last hour. Nothing restarts it \\
                until a human fixes the cause and runs `mlx-gateway watchdog --reset`."
              runbook: "docs/operations.md#when-the-watchdog-gives-up"
      - eval_time: 3m
        alertname: MLXGatewayRestartingOften
        exp_alerts:
          - exp_labels: {{severity: warning, job: mlx-gateway, instance: "mac:11435"}}
            exp_annotations:
              summary: "the watchdog restarted mlx-gateway on mac:11435 3 times in an hour"
              description: "At 5 it gives up. Read the server log for why it keeps dying."
              runbook: "docs/operations.md#where-the-logs-are"
"""


def test_key_alerts_fire(tmp_path: Path) -> None:
    tests = tmp_path / "tests.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    variables = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(queries()):
        for name, value in variables.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_contract_metrics_are_used() -> None:
    used = metric_names(RULES.read_text()) | metric_names(DASHBOARD.read_text())
    assert used <= CONTRACT, used - CONTRACT
    assert {"mlx_gateway_watchdog_gave_up", "mlx_gateway_watchdog_restarts_last_hour"} <= used


def test_the_server_declares_the_contract() -> None:
    metrics = pytest.importorskip("gateway.metrics")
    declared = {m.name + ("_total" if m.type == "counter" else "") for m in metrics.REGISTRY.collect()}
    assert declared >= CONTRACT, CONTRACT - declared


def test_dashboard_shape() -> None:
    d = dashboard()
    assert d["uid"] == "mlx-gateway" and d["schemaVersion"] >= 36
    assert [v["name"] for v in d["templating"]["list"]] == ["datasource", "job", "instance"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]

