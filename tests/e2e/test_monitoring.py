"""The real postgres_exporter (Debian's prometheus-postgres-exporter) with cde's queries file
(monitoring/queries.yaml), connected as a pg_monitor member, scraped over HTTP against a known
scenario: items sent, one rejected, one retrying, one dead, lag growing while the sink is down and
back to 0 after, a queue, a full sync. Every scrape has no query error. The alert rules' and the
dashboard's expressions name only metrics the scrape shows."""

import json
import re
import shutil
import subprocess
import urllib.request

import pytest
import yaml

from conftest import PORT, ROOT, SOCKET, wait_until

EXPORTER = shutil.which("prometheus-postgres-exporter") or shutil.which("postgres_exporter")
LISTEN = "127.0.0.1:19187"
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Exporter:
    def __init__(self, log):
        self.log = log

    def scrape(self):
        """{(name, frozenset of labels): value}; fails on a scrape that had a query error."""
        with urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = LINE.match(line)
            if m and not line.startswith("#"):
                out[(m[1], frozenset(LABEL.findall(m[2] or "")))] = float(m[3])
        assert self.value(out, "pg_up") == 1
        assert self.value(out, "pg_exporter_last_scrape_error") == 0, self.errors()
        return out

    def errors(self):
        return [l for l in self.log.read_text().splitlines() if "level=error" in l or "level=warn" in l]

    @staticmethod
    def value(scrape, name, **labels):
        want = set(labels.items())
        found = [v for (n, ls), v in scrape.items() if n == name and want <= set(ls)]
        assert len(found) == 1, f"{name} {labels}: {len(found)} series"
        return found[0]

    @staticmethod
    def names(scrape):
        return {n for n, _ in scrape}


@pytest.fixture
def exporter(db, tmp_path):
    assert EXPORTER, "prometheus-postgres-exporter is not installed (scripts/setup installs it)"
    db.run("DROP ROLE IF EXISTS cde_test_exporter")
    db.run("CREATE ROLE cde_test_exporter LOGIN IN ROLE pg_monitor")
    log = tmp_path / "exporter.log"
    env = {"DATA_SOURCE_NAME": f"host={SOCKET} port={PORT} user=cde_test_exporter dbname=cde sslmode=disable",
           "PATH": "/usr/bin:/bin"}
    with open(log, "w") as out:
        proc = subprocess.Popen([EXPORTER, f"--web.listen-address={LISTEN}",
                                 f"--extend.query-path={ROOT / 'monitoring' / 'queries.yaml'}",
                                 "--disable-default-metrics", "--disable-settings-metrics",
                                 # 0.11's own collectors read pg_stat_bgwriter as it was before 17
                                 "--no-collector.bgwriter", "--no-collector.database"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    e = Exporter(log)

    def up():
        try:
            return e.scrape()
        except (OSError, AssertionError):
            return None
    try:
        wait_until("the exporter to answer", up, timeout=15, interval=0.2)
        yield e
        assert e.errors() == [], "the exporter logged errors"
    finally:
        proc.terminate()
        proc.wait(10)
        db.run("DROP ROLE IF EXISTS cde_test_exporter")


def metric(e, name, **labels):
    return e.value(e.scrape(), name, database="cde", **labels)


def test_metrics_follow_a_known_scenario(catalog, sink, exporter):
    e = exporter
    catalog.configure(retry_interval="1h")
    items = catalog.one("SELECT items FROM cde_feed_status WHERE feed = 'products'")
    p = {"feed": "products"}
    assert metric(e, "cde_feed_items", status="sent", **p) == items
    assert metric(e, "cde_worker_up") == 1
    assert metric(e, "cde_worker_state_active", state="idle") + metric(e, "cde_worker_state_active", state="working") == 1
    assert metric(e, "cde_destination_state_active", destination="default", state="ok") == 1
    sent_before = metric(e, "cde_feed_items_sent_total", **p)

    # One rejected, one retrying, one dead.
    sink.fault(feed="products", reject={"key": "5", "error": "bad sku"})
    catalog.run("UPDATE products SET name = 'rejected' WHERE id = 5")
    wait_until("5 rejected", lambda: metric(e, "cde_feed_items", status="rejected", **p) == 1)
    assert metric(e, "cde_feed_items_rejected_total", **p) == 1
    sink.clear_faults()
    sink.fault(feed="products", status=503, body="down")
    catalog.run("UPDATE products SET name = 'retrying' WHERE id = 6")
    wait_until("6 retrying", lambda: metric(e, "cde_feed_items", status="retrying", **p) == 1)
    catalog.configure(max_attempts=1)
    catalog.run("UPDATE products SET name = 'dead' WHERE id = 7")
    wait_until("7 dead", lambda: metric(e, "cde_feed_items", status="dead", **p) == 1)
    s = e.scrape()
    v = lambda name, **l: e.value(s, name, database="cde", **{**p, **l})
    assert (v("cde_feed_items", status="sent"), v("cde_feed_items", status="pending")) == (items - 3, 0)
    assert v("cde_feed_items_dead_total") == 1 and v("cde_feed_items_retried_total") == 1
    assert v("cde_feed_items_sent_total") == sent_before
    assert e.value(s, "cde_destination_requests_failed_total", destination="default") >= 2
    state = catalog.one("SELECT replace(state, ' ', '_') FROM cde_destinations WHERE name = 'default'")
    assert e.value(s, "cde_destination_state_active", destination="default", state=state) == 1

    # Lag grows while the sink is down...
    lag1 = v("cde_feed_lag_seconds")
    assert lag1 > 0
    wait_until("the lag to grow", lambda: metric(e, "cde_feed_lag_seconds", **p) > lag1 + 0.5, timeout=5, interval=0.2)
    # ...and is 0 once everything is delivered.
    sink.clear_faults()
    assert catalog.one("SELECT cde_retry_failed('products')") == 3
    wait_until("everything sent", lambda: metric(e, "cde_feed_items", status="sent", **p) == items)
    s = e.scrape()
    assert v("cde_feed_lag_seconds") == 0 and v("cde_feed_pending_items") == 0
    assert v("cde_feed_items_sent_total") == sent_before + 3
    assert 0 <= v("cde_feed_last_sent_age_seconds") < 60
    assert e.value(s, "cde_destination_last_success_age_seconds", destination="default") < 60


def test_queue_and_full_sync_metrics(catalog, exporter):
    e = exporter
    p = {"feed": "products"}
    catalog.configure(pause="on")
    for i in range(1, 51):
        catalog.run("UPDATE products SET name = name || '!' WHERE id = %s", i)
    s = e.scrape()
    assert e.value(s, "cde_queue_rows", database="cde", **p) == 50
    assert e.value(s, "cde_queue_keys", database="cde", **p) == 50
    assert e.value(s, "cde_feed_pending_items", database="cde", **p) == 50
    assert e.value(s, "cde_queue_oldest_age_seconds", database="cde", **p) > 0
    assert e.value(s, "cde_worker_up", database="cde") == 1
    assert e.value(s, "cde_worker_state_active", database="cde", state="paused") == 1

    # A full sync, held by the pause: running, its phases planned.
    run = catalog.one("SELECT cde_full_sync()")
    s = e.scrape()
    assert e.value(s, "cde_sync_running", database="cde") == 1
    assert e.value(s, "cde_sync_run_age_seconds", database="cde") >= 0
    phases = {dict(l)["feed"] for n, l in s if n == "cde_sync_phase_ordinal"}
    assert phases == set(catalog.one("SELECT feeds FROM cde_sync_runs WHERE run_id = %s", run))

    catalog.configure(pause=None)
    wait_until("the run to finish", lambda: catalog.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=60)
    s = e.scrape()
    assert e.value(s, "cde_sync_running", database="cde") == 0
    assert e.value(s, "cde_sync_last_run_failed", database="cde") == 0
    assert e.value(s, "cde_sync_last_run_duration_seconds", database="cde") > 0
    wait_until("the queue collected", lambda: metric(e, "cde_queue_rows", **p) == 0)


def expressions():
    """Every PromQL expression of the alert rules and the dashboard, with where it comes from."""
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            yield r["alert"], r["expr"]

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield where, node["expr"]
            if isinstance(node.get("query"), str) and "label_values" in node["query"]:
                yield where, node["query"]
            for k, child in node.items():
                yield from walk(child, node.get("title", where) if isinstance(node.get("title"), str) else where)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child, where)
    yield from walk(json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text()), "dashboard")


def test_rules_and_dashboard_name_only_exported_metrics(catalog, exporter):
    # With a full sync running, every metric of the queries file has a series.
    catalog.configure(pause="on")
    catalog.one("SELECT cde_full_sync()")
    names = exporter.names(exporter.scrape())
    declared = set()
    for key, q in yaml.safe_load((ROOT / "monitoring" / "queries.yaml").read_text()).items():
        for m in q["metrics"]:
            (col, spec), = m.items()
            if spec["usage"] != "LABEL":
                declared.add(f"{key}_{col}")
    assert declared <= names, declared - names
    used = {}
    for where, expr in expressions():
        for name in re.findall(r"\bcde_[a-z0-9_]+", expr):
            used.setdefault(name, where)
    assert used, "no expression found"
    unknown = {n: w for n, w in used.items() if n not in names}
    assert unknown == {}, f"expressions name metrics the exporter does not export: {unknown}"
    catalog.configure(pause=None)
