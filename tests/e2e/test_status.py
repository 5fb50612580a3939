"""The operator views against a known scenario: items sent, one rejected, one retrying, one dead,
and lag growing while the sink is down."""

import time

from conftest import wait_until


def status(db):
    cols = ["items", "pending", "sent", "rejected", "retrying", "dead", "deleted", "lag", "last_error", "worker_running"]
    row = db.rows(f"SELECT {', '.join(cols)} FROM cde_feed_status WHERE feed = 'products'")[0]
    return dict(zip(cols, row))


def test_views_count_a_known_scenario(catalog, sink):
    catalog.configure(retry_interval="1h")
    items = status(catalog)["items"]
    assert status(catalog)["sent"] == items and status(catalog)["worker_running"] is True

    sink.fault(feed="products", reject={"key": "5", "error": "bad sku"})
    catalog.run("UPDATE products SET name = 'rejected' WHERE id = 5")
    wait_until("5 rejected", lambda: status(catalog)["rejected"] == 1)

    sink.clear_faults()
    sink.fault(feed="products", status=503, body="down")          # down until cleared
    catalog.run("UPDATE products SET name = 'retrying' WHERE id = 6")
    wait_until("6 retrying", lambda: status(catalog)["retrying"] == 1)

    catalog.configure(max_attempts=1)
    catalog.run("UPDATE products SET name = 'dead' WHERE id = 7")
    wait_until("7 dead", lambda: status(catalog)["dead"] == 1)

    s = status(catalog)
    assert (s["items"], s["sent"], s["rejected"], s["retrying"], s["dead"], s["pending"]) == (items, items - 3, 1, 1, 1, 0)
    assert s["last_error"] == "HTTP 503: down"
    assert catalog.rows("SELECT key, status, http_status, error, attempts FROM cde_failed_items ORDER BY key") == [
        ("5", "rejected", None, "bad sku", 1),
        ("6", "retrying", 503, "HTTP 503: down", 1),
        ("7", "dead", 503, "HTTP 503: down", 1),
    ]
    assert catalog.one("SELECT next_attempt_at > now() + interval '50 minutes' FROM cde_failed_items WHERE key = '6'")

    # Lag: the age of the oldest change not delivered; it grows while the sink is down.
    lag1 = status(catalog)["lag"]
    wait_until("lag to grow", lambda: status(catalog)["lag"] > lag1, timeout=5, interval=0.1)
    assert lag1.total_seconds() > 0

    w = catalog.rows("SELECT running, state, iterations > 0, documents_sent > 0, requests >= requests_failed, requests_failed >= 2 FROM cde_worker_status")[0]
    assert w[0] is True and w[1] in ("idle", "working") and all(w[2:])

    # Recovery: the sink is back, failed items are sent on request, the lag is zero again.
    sink.clear_faults()
    assert catalog.one("SELECT cde_retry_failed('products')") == 3
    wait_until("everything sent", lambda: status(catalog)["sent"] == items)
    assert status(catalog)["lag"].total_seconds() == 0
