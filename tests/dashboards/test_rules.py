"""promtool on the shipped Prometheus config, the alert rules and their unit tests, and the dashboard's PromQL."""

import json
import subprocess
from pathlib import Path

PROMETHEUS = Path(__file__).parents[2] / "dashboards" / "prometheus"


def promtool_ok(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_scrape_config_and_its_rule_file_are_valid(promtool):
    assert "1 rule files found" in promtool_ok(promtool, "check", "config", "prometheus.yml")


def test_the_alert_rules_are_valid(promtool):
    assert "5 rules found" in promtool_ok(promtool, "check", "rules", "alerts.yml")


def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_expect(promtool):
    promtool_ok(promtool, "test", "rules", "alerts_test.yml")


def test_every_dashboard_expression_is_valid_promql(promtool, queries, tmp_path):
    # As recording rules, so that promtool parses each expression. JSON is YAML.
    rules = [{"record": f"starling_dashboard:query_{index}", "expr": expr} for index, expr in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"{len(rules)} rules found" in promtool_ok(promtool, "check", "rules", str(path))
