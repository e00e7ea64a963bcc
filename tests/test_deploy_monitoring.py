"""deploy/prometheus.yml and deploy/alerts.yml parse, and speak of metrics mesh serves."""

from __future__ import annotations

import re

import yaml
from prometheus_client import Counter, Gauge, Histogram

from mesh import metrics
from mesh.alerts import load_rules
from mesh.handlers.monitor import SAMPLE_RULES
from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def _served_metric_names() -> set[str]:
    names = {"mesh_live_workers", "mesh_activations"}  # read at scrape time
    for collector in vars(metrics).values():
        if isinstance(collector, Counter):  # exposed with its _total
            names.add(collector._name + "_total")  # type: ignore[attr-defined]
        elif isinstance(collector, Gauge | Histogram):
            names.add(collector._name)  # type: ignore[attr-defined]
    for family in metrics.HANDLED.collect():  # the per-message tally's metrics
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_prometheus_config_scrapes_and_loads_the_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"mesh-services", "mesh-workers"} <= set(jobs)
    for job in jobs.values():
        for target in job["static_configs"][0]["targets"]:
            assert re.fullmatch(r"[\w.-]+:\d+", target), target


def test_alerting_rules_use_only_metrics_mesh_serves() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    served = _served_metric_names()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 5
    for rule in alerts:
        assert rule["alert"] and rule["expr"] and rule["labels"]["severity"]
        used = set(re.findall(r"\bmesh_[a-z_]+", rule["expr"]))
        bases = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
        assert bases <= served, (rule["alert"], bases - served)


def test_the_monitors_sample_rules_load() -> None:
    rules = load_rules(SAMPLE_RULES.read_text())
    assert "no_live_workers" in {r.name for r in rules}
