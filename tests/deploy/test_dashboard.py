"""The Grafana dashboard is a valid, provisioned dashboard, its PromQL parses, and every metric it (and
the alert rules, the autoscaler, the adapter) queries is exposed by a running server's /metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.deploy.processes import FAST, Replica, require
from tests.server_process import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "canvas-serve.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
METRIC = re.compile(r"(?<![\w:])(canvas_serve_\w+|vllm:[\w:]+)")
"""Our series names in PromQL; a recorded series (`model_name:canvas_serve_...:p95_5m`) is not one."""
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*", "$instance": ".*"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in panels() for t in p["targets"]]
    return queries + [v["query"]["query"] for v in dashboard()["templating"]["list"]]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def autoscaling_metrics() -> set[str]:
    hpa = yaml.safe_load((REPO / "deploy" / "k8s" / "hpa.yaml").read_text())
    adapter = yaml.safe_load((REPO / "deploy" / "prometheus" / "adapter-values.yaml").read_text())
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    return names | {n for rule in adapter["rules"]["custom"] for n in METRIC.findall(rule["seriesQuery"])}


def test_dashboard_is_valid_and_provisioned() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    for panel in panels():
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "canvas-serve.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    text = " ".join(dashboard_queries())
    for metric in [
        "canvas_serve_generation_tokens_total",  # throughput
        "canvas_serve_time_to_first_token_seconds_bucket",
        "canvas_serve_e2e_request_latency_seconds_bucket",
        "canvas_serve_num_requests_waiting",  # queue
        "canvas_serve_kv_cache_usage_perc",
        "canvas_serve_steps_per_canvas_bucket",
        "canvas_serve_tokens_per_denoise_step_sum",
        "canvas_serve_iteration_denoise_canvases_sum",  # batch composition
        "canvas_serve_http_responses_total",  # errors
        "canvas_serve_prefix_cache_hits_total",  # prefix cache hit rate
        "canvas_serve_prefix_cache_queries_total",
    ]:
        assert metric in text, metric


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule (Grafana's variables filled)."""
    promtool = require("promtool")
    rules = []
    for i, query in enumerate(dashboard_queries()[: -len(dashboard()["templating"]["list"])]):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_queried_metric_is_exposed(replica: Replica) -> None:
    """Traffic first (a completion, a streamed chat, a 404), so labelled series have samples."""
    with httpx.Client(base_url=replica.url, timeout=120) as http:
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **FAST}).status_code == 200
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, **FAST}
        with http.stream("POST", "/v1/chat/completions", json=chat) as stream:
            assert stream.status_code == 200
            assert "[DONE]" in "".join(stream.iter_text())
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}).status_code == 404
    exposed = {key.split("{", 1)[0] for key in replica.metrics()}
    queried = {m for q in dashboard_queries() + rule_queries() for m in METRIC.findall(q)}
    queried |= autoscaling_metrics()
    assert queried, "no metric names found in the queries"
    assert queried <= exposed, f"queried but not exposed: {sorted(queried - exposed)}"
