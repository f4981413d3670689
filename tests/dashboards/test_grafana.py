"""The Grafana dashboard: generated, well formed, on the ${datasource} variable; and its provisioning."""

import importlib.util
import itertools
import json
from pathlib import Path

import yaml

DASHBOARDS = Path(__file__).parents[2] / "dashboards"
GRAFANA = DASHBOARDS / "grafana"
PANEL_TYPES = {"stat", "timeseries", "table", "bargauge", "text", "row"}
NO_DATASOURCE = {"row", "text"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_committed_json_is_the_generators_output():
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.OUTPUT == GRAFANA / "starling.json"
    assert generate.OUTPUT.read_text() == generate.render(), "run `python dashboards/generate.py` and commit"


def test_dashboard_identity_and_schema(dashboard):
    assert dashboard["schemaVersion"] >= 39
    uids = [d.get("uid") for d in (json.loads(p.read_text()) for p in GRAFANA.glob("*.json"))]
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40 and uids.count(dashboard["uid"]) == 1


def test_panels_have_unique_ids_known_types_and_do_not_overlap_on_the_grid(panels):
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    assert {panel["type"] for panel in panels} <= PANEL_TYPES
    cells = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for cell in itertools.product(range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])):
            assert cell not in cells, f"{panel['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = panel["title"]


def test_every_query_goes_through_the_datasource_variable(dashboard, panels):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == "starling-prometheus"
    for panel in panels:
        if panel["type"] in NO_DATASOURCE:
            assert "targets" not in panel, panel["title"]
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_provisioning_names_the_datasource_uid_and_loads_the_dashboard_folder():
    provisioning = GRAFANA / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["uid"] == "starling-prometheus" and source["type"] == "prometheus" and source["url"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "starling.yml").read_text())["providers"]
    assert provider["type"] == "file" and Path(provider["options"]["path"]).is_absolute()
