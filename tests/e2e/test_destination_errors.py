"""No failure spreads: a misconfigured destination (a wrong key, a wrong URL) is held, not turned
into rejections; an error in one feed's step is caught, recorded and backed off, while the other
feeds keep arriving and the worker never exits. Against the real worker and sink."""

import time

from conftest import SERVER_LOG, connect, wait_until


def name_at_sink(sink, key, feed="products"):
    doc = sink.doc(feed, key)
    return doc["data"].get("name") if doc and doc.get("data") else None


def requests_to(sink, feed="products"):
    return len(sink.log(feed))


def held_error(db):
    return db.one("SELECT destination_error FROM cde_worker_status") or ""


def _held_then_fixed(catalog, sink, break_it, fix_it, reason):
    """500 pending items meet a misconfigured destination: one request, no split, nothing
    rejected, the reason in the views, logged once; fixed by a reload, they all arrive with no
    manual call."""
    db = catalog
    db.configure(retry_interval="5min")   # the hold lasts at least the test: only a reload ends it
    sink.reset()
    break_it()
    db.run("UPDATE products SET name = name || ' v2' WHERE id <= 200")
    db.run("UPDATE categories SET name = name || ' v2'")   # and products of every category: >= 500 items in all
    wait_until("the hold", lambda: reason in held_error(db), timeout=15)
    time.sleep(0.5)   # what more it would send, it sends now
    first = requests_to(sink) + requests_to(sink, "categories")
    assert first <= 2, f"{first} requests to a misconfigured destination (one per feed at most)"
    pending = db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'pending'")
    assert pending >= 200
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status IN ('rejected', 'retrying', 'dead')") == 0
    assert db.one("SELECT count(*) FROM cde_failed_items") == 0
    assert db.one("SELECT destination_error FROM cde_feed_status WHERE feed = 'products'").startswith(reason)
    assert db.one("SELECT hold_until > now() FROM cde_feed_status WHERE feed = 'products'")
    # More changes while held: still no request.
    db.run("UPDATE products SET name = name || ' v3' WHERE id <= 10")
    time.sleep(1.5)
    assert requests_to(sink) + requests_to(sink, "categories") == first
    assert SERVER_LOG.read_text().count(f"CDE-207 the endpoint is misconfigured: {reason}") >= 1

    fix_it()   # a reload: released, delivered, nothing to retry by hand
    wait_until("every product delivered", lambda: db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0,
               timeout=30)
    assert name_at_sink(sink, 3).endswith(" v2 v3")
    assert held_error(db) == ""
    assert db.one("SELECT count(*) FROM cde_failed_items") == 0


def test_a_wrong_key_holds_the_destination_until_it_is_fixed(catalog, sink):
    _held_then_fixed(catalog, sink,
                     break_it=lambda: (sink.call("POST", "/_sink/api-key", b"right"), catalog.configure(api_key="wrong")),
                     fix_it=lambda: catalog.configure(api_key="right"),
                     reason="unauthorized (HTTP 401)")


def test_a_wrong_url_holds_the_destination_until_it_is_fixed(catalog, sink):
    endpoint = catalog.one("SHOW cde.endpoint")
    _held_then_fixed(catalog, sink,
                     break_it=lambda: sink.fault(status=404, body="no such route"),
                     fix_it=lambda: (sink.clear_faults(), catalog.configure(poll_interval="1s")),
                     reason="not found (HTTP 404)")
    assert catalog.one("SHOW cde.endpoint") == endpoint


def test_a_huge_retry_after_is_clamped(catalog, sink):
    """Retry-After: 99999999999 holds the feed at most an hour, and kills nothing."""
    db = catalog
    pid = db.worker_pid()
    sink.fault(feed="products", status=429, retry_after="99999999999", count=1)
    db.run("UPDATE products SET name = 'after a huge retry-after' WHERE id = 4")
    wait_until("the hold", lambda: db.one("SELECT hold_until FROM cde.feeds WHERE name = 'products'"))
    hold = db.one("SELECT extract(epoch FROM hold_until - now()) FROM cde.feeds WHERE name = 'products'")
    assert 3000 < hold <= 3600, hold
    db.run("UPDATE categories SET name = 'still flowing' WHERE id = 2")
    wait_until("another feed", lambda: (sink.doc("categories", 2) or {}).get("data", {}).get("name") == "still flowing", timeout=5)
    assert db.worker_pid() == pid


def test_a_failing_step_stays_with_its_feed(catalog, sink):
    """The record of the products feed fails on every pass (a constraint refuses 'sent'): the
    error is caught and recorded, products backs off alone, categories keep arriving within a
    second, the worker never exits; once the cause is gone, products catches up."""
    db = catalog
    pid = db.worker_pid()
    db.run("ALTER TABLE cde.feed_products ADD CONSTRAINT test_no_sent CHECK (status <> 'sent') NOT VALID")
    try:
        db.run("UPDATE products SET name = 'blocked' WHERE id = 6")
        wait_until("the error recorded", lambda: "step failed" in (db.one("SELECT last_error FROM cde.feeds WHERE name = 'products'") or ""))
        for i in range(3):
            t0 = time.monotonic()
            db.run("UPDATE categories SET name = %s WHERE id = 3", f"flowing {i}")
            wait_until("the other feed", lambda: (sink.doc("categories", 3) or {}).get("data", {}).get("name") == f"flowing {i}",
                       timeout=5)
            assert time.monotonic() - t0 < 1.5
        assert db.worker_pid() == pid
        assert db.one("SELECT running FROM cde_worker_status")
        assert "CDE-301 feed products: a step failed and was rolled back" in SERVER_LOG.read_text()
    finally:
        db.run("ALTER TABLE cde.feed_products DROP CONSTRAINT test_no_sent")
    wait_until("products caught up", lambda: db.one("SELECT status FROM cde.feed_products WHERE key = '6'") == "sent", timeout=30)
    assert db.worker_pid() == pid


def test_a_feed_dropped_mid_iteration(catalog, sink):
    """A feed dropped while the worker is sending another one is skipped, not fatal."""
    db = catalog
    pid = db.worker_pid()
    db.run("SELECT cde_register_feed('extra', 'SELECT id, name FROM categories')")
    sink.fault(feed="categories", delay_ms=1500, count=1)
    db.run("UPDATE categories SET name = name || ' x' WHERE id = 1")
    time.sleep(0.3)   # the worker is waiting on the sink for categories; 'extra' comes later
    db.run("SELECT cde_drop_feed('extra')")
    db.run("UPDATE products SET name = 'after the drop' WHERE id = 8")
    wait_until("delivery goes on", lambda: name_at_sink(sink, 8) == "after the drop", timeout=10)
    assert db.worker_pid() == pid


def test_a_deadlock_on_the_record_path_stays_with_its_feed(catalog, sink):
    """The worker's record of a products delivery deadlocks with another session (which holds the
    feed's row in cde.feeds, then wants the item's row the record has updated). The worker is the
    deadlock's victim: its step is rolled back and caught, the item goes again, the worker lives."""
    db = catalog
    pid = db.worker_pid()
    with connect() as other:
        other.autocommit = False
        other.execute("SET LOCAL deadlock_timeout = '30s'")   # the worker detects it first (1 s)
        other.execute("SELECT 1 FROM cde.feeds WHERE name = 'products' FOR UPDATE")
        db.run("UPDATE products SET name = 'deadlocked' WHERE id = 7")
        wait_until("the worker's record waiting for the feed's row", lambda: db.one(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", pid), timeout=10)
        # Now the cycle: the item's row, which the waiting record has updated.
        other.execute("UPDATE cde.feed_products SET error = error WHERE key = '7'")
        other.rollback()
    wait_until("the deadlock reported", lambda: "deadlock detected" in SERVER_LOG.read_text(), timeout=10)
    t0 = time.monotonic()
    db.run("UPDATE categories SET name = 'after the deadlock' WHERE id = 4")
    wait_until("another feed", lambda: (sink.doc("categories", 4) or {}).get("data", {}).get("name") == "after the deadlock",
               timeout=5)
    assert time.monotonic() - t0 < 1.5
    wait_until("the deadlocked item delivered", lambda: db.one("SELECT status FROM cde.feed_products WHERE key = '7'") == "sent",
               timeout=30)
    assert name_at_sink(sink, 7) == "deadlocked"
    assert db.worker_pid() == pid
