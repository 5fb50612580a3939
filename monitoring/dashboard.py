#!/usr/bin/env python3
"""Writes monitoring/grafana-dashboard.json, the Grafana dashboard of cde.

    python3 monitoring/dashboard.py            (--check: only compare with the committed file)

Plain python3, standard library only. The output is deterministic (keys sorted, panel ids and
positions assigned in the order of PANELS below): run it after editing this file and commit both.

Every PromQL expression uses only the metrics that postgres_exporter exports with cde's queries
file (monitoring/queries.yaml): every series carries `database`, Prometheus adds `job` and
`instance`. The dashboard's variables:
  DS_PROMETHEUS  the Prometheus data source (chosen at import, or in the dashboard)
  instance       label_values(cde_worker_up, instance)
  database       label_values(cde_worker_up{instance=~"$instance"}, database)
  feed           label_values(cde_feed_pending_items{instance=~"$instance", database=~"$database"}, feed)
"""

import json
import os
import sys

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

# Label matchers: per database (worker, sync, destinations), and per feed.
DB = 'instance=~"$instance", database=~"$database"'
FEED = DB + ', feed=~"$feed"'

WIDTH = 24  # Grafana's grid is 24 columns wide


def target(expr, legend="", instant=False, ref=None):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    else:
        t.update({"instant": False, "range": True})
    return t


def timeseries(title, targets, unit="short", desc="", stack=False, w=12, h=8, minimum=None):
    defaults = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "fillOpacity": 10 if not stack else 60,
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        },
        "unit": unit,
    }
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom"},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (w, h),
    }


def stat(title, targets, unit="short", desc="", thresholds=None, mappings=None, w=4, h=4):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "mappings": mappings or [],
                "thresholds": {"mode": "absolute", "steps": steps},
                "unit": unit,
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "_size": (w, h),
    }


def bargauge(title, targets, desc="", w=12, h=8):
    return {
        "type": "bargauge",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "continuous-GrYlRd"},
                "max": 1,
                "min": 0,
                "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]},
                "unit": "percentunit",
            },
            "overrides": [],
        },
        "options": {
            "displayMode": "gradient",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
        },
        "_size": (w, h),
    }


def table(title, targets, columns, desc="", w=12, h=8):
    """An instant query shown as a table of the given label columns (in that order)."""
    keep = {c: True for c in columns}
    order = {c: i for i, c in enumerate(columns)}
    return {
        "type": "table",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"cellHeight": "sm", "showHeader": True},
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                    "includeByName": keep,
                    "indexByName": order,
                    "renameByName": {},
                },
            },
        ],
        "_size": (w, h),
    }


def state_timeline(title, targets, desc="", w=12, h=8):
    """Series that are 1 while a state is current: shown as bars over time."""
    return {
        "type": "state-timeline",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"fillOpacity": 80, "lineWidth": 0},
                "mappings": [
                    {"type": "value", "options": {"0": {"text": "-", "color": "transparent"},
                                                  "1": {"text": "current", "color": "blue"}}},
                ],
                "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "mergeValues": True,
            "rowHeight": 0.9,
            "showValue": "never",
        },
        "_size": (w, h),
    }


def phase_table():
    """The phases of the running run, one line per feed, in their order."""
    cols = [("A", "cde_sync_phase_ordinal", "order"), ("B", "cde_sync_phase_planned_items", "planned"),
            ("C", "cde_sync_phase_processed_items", "processed"), ("D", "cde_sync_phase_finished", "finished")]
    names = ["instance", "database", "feed"] + [f"Value #{ref}" for ref, _, _ in cols]
    return {
        "type": "table",
        "title": "Phases of the running run",
        "description": "cde_sync_phase_ordinal, _planned_items, _processed_items, _finished (1 when done), "
                       "per feed; the run itself is in the view cde_sync_runs.",
        "targets": [target(f"max by (instance, database, feed) ({metric}{{{FEED}}})", instant=True, ref=ref)
                    for ref, metric, _ in cols],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"cellHeight": "sm", "showHeader": True,
                    "sortBy": [{"desc": False, "displayName": "order"}]},
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "__name__": True, "job": True},
                    "includeByName": {n: True for n in names},
                    "indexByName": {n: i for i, n in enumerate(names)},
                    "renameByName": {f"Value #{ref}": label for ref, _, label in cols},
                },
            },
        ],
        "_size": (12, 8),
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (WIDTH, 1)}


RED_IF_ZERO = [{"color": "red", "value": None}, {"color": "green", "value": 1}]
RED_IF_ONE = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
UP_MAPPING = [{"type": "value", "options": {"0": {"text": "down"}, "1": {"text": "up"}}}]
YES_NO = [{"type": "value", "options": {"0": {"text": "no"}, "1": {"text": "yes"}}}]

RATE = "$__rate_interval"

PANELS = [
    row("Overview"),
    stat("Workers up", [target(f"sum(cde_worker_up{{{DB}}})", ref="A")],
         desc="Databases whose background worker runs (cde_worker_up).",
         thresholds=RED_IF_ZERO),
    stat("Workers down", [target(f"count(cde_worker_up{{{DB}}} == 0) or vector(0)", ref="A")],
         desc="Databases with cde installed and no worker running (alert CdeWorkerDown).",
         thresholds=RED_IF_ONE),
    stat("Pending items", [target(f"sum(cde_feed_pending_items{{{FEED}}})", ref="A")],
         desc="Items waiting to be sent, all selected feeds."),
    stat("Max lag", [target(f"max(cde_feed_lag_seconds{{{FEED}}})", ref="A")], unit="s",
         desc="Age of the oldest change not yet delivered, worst feed (alert CdeFeedLagHigh above 15 min).",
         thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 300},
                     {"color": "red", "value": 900}]),
    stat("Dead items", [target(f'sum(cde_feed_items{{{FEED}, status="dead"}}) or vector(0)', ref="A")],
         desc="Rows that failed cde.max_attempts times: cde_retry_failed(feed) once fixed (alert CdeItemsDead).",
         thresholds=RED_IF_ONE),
    stat("Destinations not ok",
         [target(f'count(cde_destination_state_active{{{DB}, state!="ok"}} == 1) or vector(0)', ref="A")],
         desc="Destinations holding, failing, disabled or without an endpoint (see cde_destinations).",
         thresholds=RED_IF_ONE),

    row("Feeds"),
    timeseries("Lag per feed", [target(f"cde_feed_lag_seconds{{{FEED}}}", "{{database}} {{feed}}", ref="A")],
               unit="s", minimum=0,
               desc="cde_feed_lag_seconds: age of the oldest change not yet delivered; 0 when nothing waits."),
    timeseries("Pending per feed",
               [target(f"cde_feed_pending_items{{{FEED}}}", "{{database}} {{feed}}", ref="A")], minimum=0,
               desc="cde_feed_pending_items: changed keys still queued + built rows not yet sent."),
    timeseries("Items sent per second, per feed",
               [target(f"sum by (database, feed) (rate(cde_feed_items_sent_total{{{FEED}}}[{RATE}]))",
                       "{{database}} {{feed}}", ref="A")],
               unit="ops", minimum=0, desc="rate(cde_feed_items_sent_total)."),
    timeseries("Since last delivery, per feed",
               [target(f"cde_feed_last_sent_age_seconds{{{FEED}}}", "{{database}} {{feed}}", ref="A")],
               unit="s", minimum=0,
               desc="cde_feed_last_sent_age_seconds: seconds since the feed last delivered something (empty if never)."),
    timeseries("Held feeds",
               [target(f"cde_feed_held{{{FEED}}}", "{{database}} {{feed}} -> {{destination}}", ref="A")],
               minimum=0,
               desc="cde_feed_held: 1 while the feed is held back (Retry-After, or its destination held or disabled)."),
    timeseries("Tombstones per feed",
               [target(f"cde_feed_tombstones{{{FEED}}}", "{{database}} {{feed}}", ref="A")], minimum=0,
               desc="cde_feed_tombstones: deleted items still kept in the feed table."),

    row("Failures"),
    timeseries("Item failures per second, by kind",
               [target(f"sum by (database, feed) (rate(cde_feed_items_rejected_total{{{FEED}}}[{RATE}]))",
                       "{{database}} {{feed}} rejected", ref="A"),
                target(f"sum by (database, feed) (rate(cde_feed_items_retried_total{{{FEED}}}[{RATE}]))",
                       "{{database}} {{feed}} retried", ref="B"),
                target(f"sum by (database, feed) (rate(cde_feed_items_dead_total{{{FEED}}}[{RATE}]))",
                       "{{database}} {{feed}} dead", ref="C"),
                target(f"sum by (database, feed) (rate(cde_feed_build_failures_total{{{FEED}}}[{RATE}]))",
                       "{{database}} {{feed}} build failed", ref="D")],
               unit="ops", minimum=0,
               desc="Rejected (4xx, CDE-201/202), retried (a send failed, CDE-203..205), dead "
                    "(gave up after cde.max_attempts), build failures (the source query failed, CDE-101)."),
    timeseries("Failed requests per second, per destination",
               [target(f"sum by (database, destination) "
                       f"(rate(cde_destination_requests_failed_total{{{DB}}}[{RATE}]))",
                       "{{database}} {{destination}}", ref="A")],
               unit="reqps", minimum=0, desc="rate(cde_destination_requests_failed_total)."),
    timeseries("Feed items by status",
               [target(f"sum by (database, feed, status) (cde_feed_items{{{FEED}}})",
                       "{{database}} {{feed}} {{status}}", ref="A")],
               minimum=0, w=24,
               desc="cde_feed_items: rows of each feed table by status (pending, sent, retrying, rejected, dead)."),

    row("Destinations"),
    timeseries("Requests per second, per destination",
               [target(f"sum by (database, destination) (rate(cde_destination_requests_total{{{DB}}}[{RATE}]))",
                       "{{database}} {{destination}} requests", ref="A"),
                target(f"sum by (database, destination) "
                       f"(rate(cde_destination_items_sent_total{{{DB}}}[{RATE}]))",
                       "{{database}} {{destination}} items", ref="B")],
               unit="ops", minimum=0,
               desc="rate(cde_destination_requests_total) and rate(cde_destination_items_sent_total)."),
    timeseries("Since last success, per destination",
               [target(f"cde_destination_last_success_age_seconds{{{DB}}}", "{{database}} {{destination}}",
                       ref="A")],
               unit="s", minimum=0, desc="cde_destination_last_success_age_seconds (empty if never)."),
    table("Destination state now",
          [target(f"cde_destination_state_active{{{DB}}} == 1", instant=True, ref="A")],
          ["instance", "database", "destination", "state"],
          desc="cde_destination_state_active == 1: ok, holding (CDE-207), failing (CDE-204..206), "
               "disabled (410, CDE-208), no_endpoint. Details in the view cde_destinations."),
    state_timeline("Destination state over time",
                   [target(f"cde_destination_state_active{{{DB}}} == 1",
                           "{{database}} {{destination}}: {{state}}", ref="A")],
                   desc="One bar per destination and state, drawn while that state is current."),

    row("Queue"),
    timeseries("Queued keys per feed",
               [target(f"cde_queue_keys{{{FEED}}}", "{{database}} {{feed}}", ref="A")], minimum=0,
               desc="cde_queue_keys: changed keys captured and not yet collected (alert CdeQueueGrowing)."),
    timeseries("Queue rows per feed",
               [target(f"cde_queue_rows{{{FEED}}}", "{{database}} {{feed}}", ref="A")], minimum=0,
               desc="cde_queue_rows: rows of cde.queue (one per writing statement, at most 5,000 keys each)."),
    timeseries("Oldest queued change per feed",
               [target(f"cde_queue_oldest_age_seconds{{{FEED}}}", "{{database}} {{feed}}", ref="A")],
               unit="s", minimum=0, w=24, h=6, desc="cde_queue_oldest_age_seconds; 0 when empty."),

    row("Full sync"),
    stat("Sync running", [target(f"cde_sync_running{{{DB}}}", "{{database}}", ref="A")],
         mappings=YES_NO, thresholds=[{"color": "text", "value": None}, {"color": "blue", "value": 1}],
         desc="cde_sync_running: a full sync run is running (cde_sync_runs)."),
    stat("Last run failed", [target(f"cde_sync_last_run_failed{{{DB}}}", "{{database}}", ref="A")],
         mappings=YES_NO, thresholds=RED_IF_ONE,
         desc="cde_sync_last_run_failed: the most recent run that ended failed (cde_sync_runs.error; alert CdeFullSyncFailed)."),
    stat("Running for", [target(f"cde_sync_run_age_seconds{{{DB}}}", "{{database}}", ref="A")], unit="s",
         desc="cde_sync_run_age_seconds: age of the running run, 0 if none."),
    stat("Last run took", [target(f"cde_sync_last_run_duration_seconds{{{DB}}}", "{{database}}", ref="A")],
         unit="s", desc="cde_sync_last_run_duration_seconds."),
    stat("Last run ended", [target(f"cde_sync_last_run_finished_timestamp_seconds{{{DB}}} * 1000",
                                   "{{database}}", ref="A")],
         unit="dateTimeFromNow", desc="cde_sync_last_run_finished_timestamp_seconds."),
    stat("Sync builders", [target(f"cde_worker_sync_builders{{{DB}}}", "{{database}}", ref="A")],
         desc="cde_worker_sync_builders: sync builder processes running now (cde.sync_builders wanted)."),
    bargauge("Run progress",
             [target(f"cde_sync_processed_items{{{DB}}} / (cde_sync_planned_items{{{DB}}} > 0)",
                     "{{database}}", ref="A")],
             desc="cde_sync_processed_items / cde_sync_planned_items of the running run."),
    bargauge("Phase progress",
             [target(f"cde_sync_phase_processed_items{{{FEED}}} / (cde_sync_phase_planned_items{{{FEED}}} > 0)",
                     "{{database}} {{feed}}", ref="A")],
             desc="cde_sync_phase_processed_items / cde_sync_phase_planned_items, per phase (feed) of the running run."),
    timeseries("Items processed by the run",
               [target(f"cde_sync_processed_items{{{DB}}}", "{{database}} processed", ref="A"),
                target(f"cde_sync_planned_items{{{DB}}}", "{{database}} planned", ref="B")],
               minimum=0, desc="cde_sync_processed_items and cde_sync_planned_items (alert CdeFullSyncStuck)."),
    phase_table(),

    row("Worker"),
    stat("Worker up", [target(f"cde_worker_up{{{DB}}}", "{{database}}", ref="A")],
         mappings=UP_MAPPING, thresholds=RED_IF_ZERO, w=6, h=6,
         desc="cde_worker_up: the database's background worker runs (else see cde_worker_status.state)."),
    table("Worker state now",
          [target(f"cde_worker_state_active{{{DB}}} == 1", instant=True, ref="A")],
          ["instance", "database", "state"], w=6, h=6,
          desc="cde_worker_state_active == 1: idle, working, paused (cde.pause), starting, waiting, stopped."),
    timeseries("Since last iteration",
               [target(f"cde_worker_last_iteration_age_seconds{{{DB}}}", "{{database}}", ref="A")],
               unit="s", minimum=0, h=6,
               desc="cde_worker_last_iteration_age_seconds: a worker that stops iterating is stuck."),
    state_timeline("Worker state over time",
                   [target(f"cde_worker_state_active{{{DB}}} == 1", "{{database}}: {{state}}", ref="A")],
                   desc="One bar per database and state, drawn while that state is current."),
    timeseries("Worker throughput",
               [target(f"sum by (database) (rate(cde_worker_documents_sent_total{{{DB}}}[{RATE}]))",
                       "{{database}} documents/s", ref="A"),
                target(f"sum by (database) (rate(cde_worker_requests_total{{{DB}}}[{RATE}]))",
                       "{{database}} requests/s", ref="B"),
                target(f"sum by (database) (rate(cde_worker_requests_failed_total{{{DB}}}[{RATE}]))",
                       "{{database}} failed requests/s", ref="C"),
                target(f"sum by (database) (rate(cde_worker_iterations_total{{{DB}}}[{RATE}]))",
                       "{{database}} iterations/s", ref="D")],
               unit="ops", minimum=0, desc="Rates of the worker's counters."),
    timeseries("Bytes sent per second",
               [target(f"sum by (database) (rate(cde_worker_bytes_sent_total{{{DB}}}[{RATE}]))",
                       "{{database}}", ref="A")],
               unit="Bps", minimum=0, w=24, h=6, desc="rate(cde_worker_bytes_sent_total), after compression."),
]


def variable(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "hide": 0,
        "options": [],
    }


def layout(panels):
    """Assigns ids and grid positions, left to right, wrapping at 24 columns."""
    out = []
    x = y = line_h = 0
    for pid, p in enumerate(panels, start=1):
        p = dict(p)
        w, h = p.pop("_size")
        if x + w > WIDTH:
            x, y, line_h = 0, y + line_h, 0
        p["id"] = pid
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        if p["type"] != "row":
            p["datasource"] = DS
        out.append(p)
        x += w
        line_h = max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return out


def dashboard():
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "description": "cde: change data delivery from PostgreSQL (metrics of postgres_exporter "
                       "with monitoring/queries.yaml). Generated by monitoring/dashboard.py.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": layout(PANELS),
        "refresh": "30s",
        "schemaVersion": 38,
        "tags": ["cde", "postgresql"],
        "templating": {"list": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
                "regex": "",
            },
            variable("instance", "Instance", "label_values(cde_worker_up, instance)"),
            variable("database", "Database", 'label_values(cde_worker_up{instance=~"$instance"}, database)'),
            variable("feed", "Feed",
                     'label_values(cde_feed_pending_items{instance=~"$instance", database=~"$database"}, feed)'),
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "cde",
        "uid": "cde-overview",
        "version": 1,
        "weekStart": "",
    }


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grafana-dashboard.json")
    text = json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if sys.argv[1:] == ["--check"]:
        # The committed JSON is what this file writes (scripts/check-monitoring).
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                sys.exit(f"{path} is not what monitoring/dashboard.py writes: run it and commit both")
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
