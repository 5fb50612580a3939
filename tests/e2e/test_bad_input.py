"""Bad input at run time: each with a clear outcome and no harm to the rest."""

from conftest import fresh_catalog, full_sync_and_wait, wait_until


def test_a_document_over_max_batch_bytes_is_sent_alone_and_blocks_nothing(catalog, sink):
    catalog.configure(max_batch_bytes="2kB")
    catalog.run("UPDATE products SET description = repeat('x', 6000) WHERE id = 3")
    catalog.run("UPDATE products SET name = name || ' +' WHERE id IN (1, 2, 4, 5)")
    wait_until("all five delivered", lambda: all(k in {k for r in sink.log("products") for k in r["keys"]} for k in "12345"))
    big = [r for r in sink.log("products") if "3" in r["keys"]][0]
    assert big["items"] == 1 and big["raw_bytes"] > 6000
    assert all(r["raw_bytes"] <= 2048 for r in sink.log("products") if "3" not in r["keys"])

    # A receiver that refuses it (413) rejects that item only, with the reason.
    sink.fault(feed="products", reject={"contains": "xxxxxxxxxx"}, reject_mode="batch", status=413)
    catalog.run("UPDATE products SET description = repeat('y', 100) || repeat('x', 6000) WHERE id = 3")
    catalog.run("UPDATE products SET name = 'after big' WHERE id = 4")
    wait_until("3 rejected", lambda: catalog.one("SELECT status FROM cde.feed_products WHERE key = '3'") == "rejected")
    assert catalog.one("SELECT http_status FROM cde.feed_products WHERE key = '3'") == 413
    wait_until("4 delivered", lambda: sink.doc("products", 4)["data"]["name"] == "after big")


def test_a_failing_source_query_fails_its_keys_only(catalog, sink):
    # A feed whose query divides by a value the writers can set to zero.
    catalog.run("SELECT cde_register_feed('ratios', 'SELECT id, 100 / (id % 10) AS ratio FROM products WHERE id <= 30')")
    catalog.run("SELECT cde_track('ratios', 'products')")
    catalog.run("UPDATE products SET name = name || ' r' WHERE id BETWEEN 8 AND 12")
    wait_until("9, 11, 12 and 8 delivered", lambda: {"8", "9", "11", "12"} <= set(sink.docs("ratios")))
    assert "10" not in sink.docs("ratios")
    assert catalog.rows("SELECT key, status, error FROM cde_failed_items WHERE feed = 'ratios'") == [
        ("10", "retrying", "build failed: division by zero")]
    # The other feeds keep flowing meanwhile.
    catalog.run("UPDATE products SET name = 'still flowing' WHERE id = 10")
    wait_until("products still delivered", lambda: sink.doc("products", 10)["data"]["name"] == "still flowing")


def test_the_extension_dropped_while_the_worker_runs(db, sink):
    fresh_catalog(db)
    full_sync_and_wait(db)
    workers = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cde worker'"
    assert db.one(workers) == 1
    db.run("SET client_min_messages = warning")
    db.run("DROP EXTENSION cde CASCADE")
    # Writers are unaffected; the worker stops at its next look (this database then costs
    # nothing), and CREATE EXTENSION asks the launcher for one again.
    db.run("UPDATE products SET name = 'no cde' WHERE id = 1")
    wait_until("the worker gone", lambda: db.one(workers) == 0)
    db.run("CREATE EXTENSION cde")
    db.script(__import__("conftest").CATALOG / "feeds.sql")
    wait_until("the worker running again", lambda: db.one("SELECT running FROM cde_worker_status"))
    sink.reset()
    db.run("UPDATE products SET name = 'cde again' WHERE id = 1")
    wait_until("delivery", lambda: (sink.doc("products", 1) or {}).get("data", {}).get("name") == "cde again")
