"""Generate the Starling Grafana dashboard: `python dashboards/generate.py` writes grafana/starling.json."""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).parent / "grafana" / "starling.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROVISIONED_DATASOURCE_UID = "starling-prometheus"
GRID_COLUMNS = 24
RATE = "$__rate_interval"


def target(expr: str, legend: str, ref: str = "A", instant: bool = False, table: bool = False) -> dict:
    """One PromQL query of a panel."""
    query = {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
    }
    if table:
        query["format"] = "table"
    return query


def thresholds(*steps: tuple[str, float | None]) -> dict:
    """Colours from each value up (None: from minus infinity)."""
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def stat(
    title: str,
    description: str,
    targets: list[dict],
    unit: str = "none",
    decimals: int | None = None,
    steps: tuple[tuple[str, float | None], ...] = (("blue", None),),
    text_mode: str = "value",
) -> dict:
    """A headline figure: the latest value of each series."""
    defaults = {"unit": unit, "color": {"mode": "thresholds"}, "thresholds": thresholds(*steps)}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": text_mode,
            "wideLayout": True,
            "showPercentChange": False,
        },
    }


def timeseries(
    title: str,
    description: str,
    targets: list[dict],
    unit: str = "short",
    decimals: int | None = None,
    stacked: bool = False,
    right_axis: tuple[str, ...] = (),
) -> dict:
    """A chart over time; series named in right_axis get an axis of their own on the right."""
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "spanNulls": True,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
    }
    defaults = {"unit": unit, "color": {"mode": "palette-classic"}, "custom": custom}
    if decimals is not None:
        defaults["decimals"] = decimals
    overrides = [
        {"matcher": {"id": "byName", "options": name}, "properties": [{"id": "custom.axisPlacement", "value": "right"}]}
        for name in right_axis
    ]
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True, "calcs": []},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def bargauge(title: str, description: str, targets: list[dict]) -> dict:
    """Horizontal bars, one per series."""
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": "short",
                "min": 0,
                "color": {"mode": "palette-classic"},
                "thresholds": thresholds(("blue", None)),
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "sizing": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "maxVizHeight": 300,
        },
    }


def table(title: str, description: str, columns: dict[str, str]) -> dict:
    """One row per peer instance: columns maps a column name to a PromQL expression giving one value per instance."""
    refs = [chr(ord("A") + index) for index in range(len(columns))]
    targets = [
        target(f"max by (instance) ({expr})", name, ref, instant=True, table=True)
        for ref, (name, expr) in zip(refs, columns.items())
    ]
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"custom": {"align": "auto"}}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm", "sortBy": [{"displayName": "instance", "desc": False}]},
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "indexByName": {},
                    "renameByName": {f"Value #{ref}": name for ref, name in zip(refs, columns)},
                },
            },
        ],
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def layout(lines: list[dict | tuple[int, list[tuple[int, dict]]]]) -> list[dict]:
    """Number the panels and place them on the grid, top to bottom.

    Each line is either a row panel or (height, [(width, panel), ...]) laid out left to right.
    """
    panels: list[dict] = []
    y = 0
    for line in lines:
        height, cells = (1, [(GRID_COLUMNS, line)]) if isinstance(line, dict) else line
        x = 0
        for width, panel in cells:
            panels.append({"id": len(panels) + 1, "gridPos": {"h": height, "w": width, "x": x, "y": y}, **panel})
            x += width
        if x > GRID_COLUMNS:
            raise ValueError(f"the line at y={y} is {x} columns wide")
        y += height
    return panels


def panels() -> list[dict]:
    peers_by_kind = target("starling_active_peers", "{{kind}}")
    return layout(
        [
            row("Swarm"),
            (
                4,
                [
                    (
                        3,
                        stat(
                            "Epoch",
                            "Global epoch of the run (one optimizer step of the whole swarm)",
                            [target("starling_epoch", "epoch")],
                        ),
                    ),
                    (
                        3,
                        stat(
                            "Loss",
                            "Training loss, weighted by the peers' speed",
                            [target("starling_loss", "loss")],
                            decimals=3,
                        ),
                    ),
                    (
                        3,
                        stat(
                            "Samples/s",
                            "Swarm throughput",
                            [target("starling_samples_per_second", "samples/s")],
                            decimals=1,
                        ),
                    ),
                    (
                        3,
                        stat(
                            "Tokens/s",
                            "Swarm throughput",
                            [target("starling_tokens_per_second", "tokens/s")],
                            decimals=0,
                        ),
                    ),
                    (
                        6,
                        stat(
                            "Active peers",
                            "Peers reporting to the coordinator, by kind",
                            [peers_by_kind],
                            steps=(("red", None), ("green", 1)),
                            text_mode="value_and_name",
                        ),
                    ),
                    (
                        3,
                        stat(
                            "Epoch progress",
                            "Samples accumulated toward the next epoch, of the target batch size",
                            [target("starling_samples_this_epoch / starling_target_batch_size", "progress")],
                            unit="percentunit",
                            decimals=0,
                        ),
                    ),
                    (
                        3,
                        stat(
                            "Last checkpoint",
                            "Epoch of the latest checkpoint the coordinator saved",
                            [target("starling_checkpoint_epoch", "checkpoint")],
                        ),
                    ),
                ],
            ),
            (
                8,
                [
                    (
                        12,
                        timeseries(
                            "Loss",
                            "Training loss, weighted by the peers' speed, and the newest checkpoint's held-out "
                            "loss (coordinator --eval-data)",
                            [target("starling_loss", "training"), target("starling_eval_loss", "held-out", "B")],
                            decimals=3,
                        ),
                    ),
                    (
                        12,
                        timeseries(
                            "Throughput",
                            "Swarm samples/s (left) and tokens/s (right)",
                            [
                                target("starling_samples_per_second", "samples/s"),
                                target("starling_tokens_per_second", "tokens/s", "B"),
                            ],
                            right_axis=("tokens/s",),
                        ),
                    ),
                ],
            ),
            (
                8,
                [
                    (
                        12,
                        timeseries(
                            "Active peers by kind",
                            "Peers reporting to the coordinator, stacked by kind",
                            [peers_by_kind],
                            decimals=0,
                            stacked=True,
                        ),
                    ),
                    (
                        12,
                        timeseries(
                            "Epoch and checkpoint",
                            "Global epoch and the epoch of the latest checkpoint",
                            [target("starling_epoch", "epoch"), target("starling_checkpoint_epoch", "checkpoint", "B")],
                            decimals=0,
                        ),
                    ),
                ],
            ),
            row("Contributors (from the coordinator)"),
            (
                8,
                [
                    (
                        8,
                        bargauge(
                            "Top contributors",
                            "Samples contributed since the run began: top 10 and the rest as other",
                            [target("sort_desc(starling_contributor_samples_total)", "{{name}}", instant=True)],
                        ),
                    ),
                    (
                        16,
                        timeseries(
                            "Samples/s by contributor",
                            "Rate of each contributor's samples",
                            [target(f"rate(starling_contributor_samples_total[{RATE}])", "{{name}}")],
                        ),
                    ),
                ],
            ),
            row("Peers (scraped from each peer's --metrics-port)"),
            (
                8,
                [
                    (
                        8,
                        timeseries(
                            "Samples/s by peer",
                            "Each scraped peer's throughput",
                            [target("starling_peer_samples_per_second", "{{instance}}")],
                        ),
                    ),
                    (
                        8,
                        timeseries(
                            "Loss by peer",
                            "Loss of each scraped peer's latest micro-batch",
                            [target("starling_peer_loss", "{{instance}}")],
                            decimals=3,
                        ),
                    ),
                    (
                        8,
                        timeseries(
                            "Averaging rounds",
                            "Gradient rounds per minute that averaged every value with the "
                            "group (succeeded), only part of them (partial) or none (failed), "
                            "all scraped peers",
                            [
                                target(
                                    f"60 * sum(rate(starling_peer_averaging_rounds_succeeded_total[{RATE}]))",
                                    "succeeded",
                                ),
                                target(
                                    f"60 * sum(rate(starling_peer_averaging_rounds_partial_total[{RATE}]))",
                                    "partial",
                                    "B",
                                ),
                                target(
                                    f"60 * sum(rate(starling_peer_averaging_rounds_failed_total[{RATE}]))",
                                    "failed",
                                    "C",
                                ),
                            ],
                            unit="suffix: /min",
                        ),
                    ),
                ],
            ),
            (
                7,
                [
                    (
                        24,
                        table(
                            "Peers",
                            "Latest figures of each scraped peer",
                            {
                                "epoch": "starling_peer_epoch",
                                "samples/s": "starling_peer_samples_per_second",
                                "loss": "starling_peer_loss",
                                "samples": "starling_peer_samples_total",
                                "rounds succeeded": "starling_peer_averaging_rounds_succeeded_total",
                                "rounds partial": "starling_peer_averaging_rounds_partial_total",
                                "rounds failed": "starling_peer_averaging_rounds_failed_total",
                            },
                        ),
                    ),
                ],
            ),
        ]
    )


def dashboard() -> dict:
    return {
        "uid": "starling",
        "title": "Starling",
        "description": "A Starling training run: the coordinator's view of the swarm and the peers' own metrics",
        "tags": ["starling"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "Starling Prometheus", "value": PROVISIONED_DATASOURCE_UID},
                    "hide": 0,
                    "includeAll": False,
                    "multi": False,
                    "options": [],
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                }
            ]
        },
        "panels": panels(),
        "schemaVersion": 39,
        "version": 1,
    }


def render() -> str:
    """The dashboard as written to OUTPUT."""
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
