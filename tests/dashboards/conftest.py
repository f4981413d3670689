"""Fixtures for the dashboards/ tests: the committed dashboard, its PromQL, and the Prometheus binaries."""

import json
import shutil
from pathlib import Path

import pytest

DASHBOARDS = Path(__file__).parents[2] / "dashboards"
# Grafana's variables in the dashboard's queries, and what stands in for them outside Grafana.
TEMPLATE_VARIABLES = {"$__rate_interval": "30s"}


def installed(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` is not installed: run `make system-packages` (Debian package prometheus)")
    return path


@pytest.fixture
def dashboard() -> dict:
    return json.loads((DASHBOARDS / "grafana" / "starling.json").read_text())


@pytest.fixture
def panels(dashboard) -> list[dict]:
    """Every panel, those inside rows included."""
    return [panel for top in dashboard["panels"] for panel in [top, *top.get("panels", [])]]


@pytest.fixture
def queries(panels) -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's variables replaced, in panel order."""
    found = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in TEMPLATE_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown variable in {target['expr']!r}"
            found.append(expr)
    return found


@pytest.fixture
def promtool() -> str:
    return installed("promtool")


@pytest.fixture
def prometheus() -> str:
    return installed("prometheus")
