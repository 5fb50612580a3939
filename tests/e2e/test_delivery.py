"""Delivery by the background worker: timing, modes, batching, the protocol's headers and every
kind of failure, against the real sink."""

import os
import re
import tempfile
import time
from pathlib import Path

from conftest import SERVER_LOG, Db, connect, fresh_catalog, full_sync_and_wait, kill_worker, wait_until


def name_at_sink(sink, key):
    doc = sink.doc("products", key)
    return doc["data"]["name"] if doc else ""


def test_an_update_arrives_within_a_second_of_commit(catalog, sink):
    catalog.run("UPDATE products SET name = 'fast' WHERE id = 7")
    committed = time.monotonic()
    wait_until("the update at the sink", lambda: name_at_sink(sink, 7) == "fast", timeout=1.0, interval=0.005)
    print(f"commit to sink: {(time.monotonic() - committed) * 1000:.0f} ms")


def test_dependent_keys_reach_the_sink(catalog, sink):
    # Renaming a category re-sends every product in it, with the new name.
    members = {r[0] for r in catalog.rows("SELECT id FROM products WHERE category_id = 3")}
    catalog.run("UPDATE categories SET name = 'Renamed' WHERE id = 3")
    wait_until("every product of category 3 re-sent",
               lambda: all((sink.doc("products", k) or {}).get("data", {}).get("category", {}).get("name") == "Renamed" for k in members))
    assert sink.doc("categories", 3)["data"]["name"] == "Renamed"


def test_a_category_committed_mid_iteration_still_goes_first(catalog, sink):
    # A feed between categories and products in the worker's order that takes a while to build
    # holds an iteration open there; the rename commits meanwhile, after categories collected and
    # before products do. Products must not go before the category they now name.
    catalog.run("DROP TABLE IF EXISTS slow")
    catalog.run("CREATE TABLE slow (id int PRIMARY KEY, name text)")
    catalog.run("INSERT INTO slow VALUES (1, 'a')")
    catalog.run("""SELECT cde_register_feed('collections',
                     'SELECT s.id, s.name FROM slow s, LATERAL (SELECT pg_sleep(0.8)) nap',
                     depends_on => '{attributes}')""")
    catalog.run("SELECT cde_track('collections', 'slow')")
    order = [r[0] for r in catalog.rows("SELECT name FROM cde._feeds_in_order() ORDER BY depth, name")]
    assert order.index("categories") < order.index("collections") < order.index("products"), order
    members = {str(r[0]) for r in catalog.rows("SELECT id FROM products WHERE category_id = 3")}

    catalog.run("UPDATE slow SET name = 'b' WHERE id = 1")
    wait_until("the worker building collections", lambda: catalog.one(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cde worker' AND wait_event = 'PgSleep'") == 1)
    catalog.run("UPDATE categories SET name = 'Renamed' WHERE id = 3")
    wait_until("every product of category 3 re-sent",
               lambda: all((sink.doc("products", k) or {}).get("data", {}).get("category", {}).get("name") == "Renamed" for k in members))
    log = sink.log()
    category = min(i for i, r in enumerate(log) if r["feed"] == "categories" and "3" in r["keys"])
    products = min(i for i, r in enumerate(log) if r["feed"] == "products" and members & set(r["keys"]))
    assert category < products, [(r["feed"], r["keys"][:3]) for r in log]


def test_legacy_feeds_wait_for_their_pass(catalog, sink):
    catalog.configure(legacy_interval="3s")
    catalog.run("UPDATE prices SET amount = 12345 WHERE product_id = 5 AND currency = 'EUR'")
    t0 = time.monotonic()
    # The immediate products feed has it at once; the legacy prices feed on its next pass.
    wait_until("products feed", lambda: (sink.doc("products", 5) or {}).get("data", {}).get("prices", {}).get("EUR") == 12345)
    assert (sink.doc("prices", 5) or {}).get("data", {}).get("prices", {}).get("EUR") != 12345
    assert catalog.one("SELECT status FROM cde.feed_prices WHERE key = '5'") == "pending"
    wait_until("prices feed's legacy pass",
               lambda: (sink.doc("prices", 5) or {}).get("data", {}).get("prices", {}).get("EUR") == 12345, timeout=8)
    print(f"legacy delivery after {time.monotonic() - t0:.1f}s")


def test_batches_by_count_and_by_bytes(catalog, sink):
    catalog.configure(batch_size=7)
    catalog.run("UPDATE products SET name = name || ' b' WHERE id <= 30")
    wait_until("30 products", lambda: sum(r.get("items", 0) for r in sink.log("products") if r["status"] == 200) >= 30)
    sizes = [r["items"] for r in sink.log("products")]
    assert max(sizes) <= 7 and len(sizes) == 5, sizes

    sink.reset()
    catalog.configure(batch_size=500, max_batch_bytes="4kB")
    catalog.run("UPDATE products SET name = name || ' c' WHERE id <= 60")
    wait_until("60 products", lambda: sum(r.get("items", 0) for r in sink.log("products")) >= 60)
    log = sink.log("products")
    assert len(log) > 1 and all(r["raw_bytes"] <= 4096 for r in log), [(r["items"], r["raw_bytes"]) for r in log]


def test_gzip_authorization_and_idempotency_key(catalog, sink):
    sink.call("POST", "/_sink/api-key", b"s3cret")
    catalog.configure(api_key="s3cret")
    catalog.run("UPDATE products SET name = 'auth' WHERE id = 9")
    wait_until("the update", lambda: name_at_sink(sink, 9) == "auth")
    r = sink.log("products")[-1]
    assert r["gzip"] is True and r["authorization"] is True and r["content_type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", r["idempotency_key"])

    catalog.configure(compression="off")
    catalog.run("UPDATE products SET name = 'plain' WHERE id = 9")
    wait_until("the update", lambda: name_at_sink(sink, 9) == "plain")
    assert sink.log("products")[-1]["gzip"] is False

    # A wrong key is refused by the sink (401): the destination is held, the item is not
    # rejected (tests/e2e/test_destination_errors.py has the whole story).
    catalog.configure(api_key="wrong")
    catalog.run("UPDATE products SET name = 'nope' WHERE id = 9")
    wait_until("the hold", lambda: catalog.one("SELECT destination_error FROM cde_worker_status") or "")
    assert catalog.one("SELECT destination_error LIKE 'unauthorized (HTTP 401)%%' FROM cde_worker_status")
    assert catalog.one("SELECT status FROM cde.feed_products WHERE key = '9'") == "pending"
    assert "CDE-207 the endpoint is misconfigured: unauthorized (HTTP 401)" in SERVER_LOG.read_text()


def test_the_api_key_from_a_file_never_reaches_the_log(catalog, sink):
    key = "k-" + os.urandom(8).hex()
    path = Path(tempfile.mkdtemp(prefix="cde-key-")) / "cde.key"   # user postgres must read it
    path.parent.chmod(0o755)
    path.write_text(key + "\n")
    path.chmod(0o644)
    sink.call("POST", "/_sink/api-key", key.encode())
    catalog.configure(api_key_file=str(path), log_payloads="on")
    catalog.run("UPDATE products SET name = 'from file' WHERE id = 10")
    wait_until("the update, authorised", lambda: name_at_sink(sink, 10) == "from file")
    assert sink.log("products")[-1]["authorization"] is True
    assert key not in SERVER_LOG.read_text()


def test_same_content_same_idempotency_key(catalog, sink):
    # The sink answers 503 once: the batch is retried with exactly the same key.
    sink.fault(feed="products", status=503, count=1)
    catalog.run("UPDATE products SET name = 'idem' WHERE id = 11")
    wait_until("delivery after the retry", lambda: name_at_sink(sink, 11) == "idem", timeout=6)
    keys = [r["idempotency_key"] for r in sink.log("products")]
    assert len(keys) == 2 and keys[0] == keys[1]


def test_items_rejected_in_a_2xx_answer(catalog, sink):
    sink.fault(feed="products", reject={"key": "5", "error": "bad sku"})
    catalog.run("UPDATE products SET name = name || ' r' WHERE id IN (4, 5, 6)")
    wait_until("4 and 6 delivered", lambda: all(name_at_sink(sink, k).endswith(" r") for k in (4, 6)))
    assert not name_at_sink(sink, 5).endswith(" r")
    wait_until("5 rejected", lambda: catalog.one("SELECT status FROM cde.feed_products WHERE key = '5'") == "rejected")
    assert catalog.rows("SELECT feed, key, status, error FROM cde_failed_items") == [("products", "5", "rejected", "bad sku")]
    # Rejected items are not retried until their document changes.
    sink.clear_faults()
    assert catalog.one("SELECT count(*) FROM cde.retries") == 0
    catalog.run("UPDATE products SET name = 'fixed' WHERE id = 5")
    wait_until("5 delivered once changed", lambda: name_at_sink(sink, 5) == "fixed")


def test_a_refused_batch_is_split_to_isolate_the_bad_item(catalog, sink):
    sink.fault(feed="products", reject={"key": "13", "error": "invalid"}, reject_mode="batch", status=422)
    catalog.run("UPDATE products SET name = name || ' s' WHERE id BETWEEN 10 AND 25")
    wait_until("13 rejected", lambda: catalog.one("SELECT status FROM cde.feed_products WHERE key = '13'") == "rejected")
    good = [k for k in range(10, 26) if k != 13]
    wait_until("the 15 others delivered", lambda: all(name_at_sink(sink, k).endswith(" s") for k in good))
    row = catalog.rows("SELECT http_status, error FROM cde.feed_products WHERE key = '13'")[0]
    assert row[0] == 422 and "invalid" in row[1]
    # log2(16) levels of halving, not 16 requests.
    assert len(sink.log("products")) <= 9


def _retry_scenario(catalog, sink, fault, key, name):
    sink.fault(feed="products", **fault)
    catalog.run(f"UPDATE products SET name = '{name}' WHERE id = {key}")
    wait_until("the item in the retry table",
               lambda: catalog.one("SELECT count(*) FROM cde.retries WHERE feed = 'products' AND key = %s", str(key)) == 1
               or name_at_sink(sink, key) == name)
    wait_until("delivery once the sink recovers and the retry interval passed",
               lambda: name_at_sink(sink, key) == name, timeout=10)
    wait_until("the delivery recorded",
               lambda: catalog.one("SELECT status FROM cde.feed_products WHERE key = %s", str(key)) == "sent")
    assert catalog.one("SELECT count(*) FROM cde.retries") == 0


def test_500_goes_to_the_retry_table_and_is_delivered_later(catalog, sink):
    _retry_scenario(catalog, sink, {"status": 500, "count": 2}, 21, "after 500")
    assert [r["status"] for r in sink.log("products")][:2] == [500, 500]


def test_503_is_retried(catalog, sink):
    _retry_scenario(catalog, sink, {"status": 503, "count": 1, "body": "upstream down"}, 22, "after 503")
    # The worker's WARNING carries the stable code of the failure.
    assert "cde: CDE-204 feed products: 1 items not delivered; first: HTTP 503: upstream down" in SERVER_LOG.read_text()


def test_429_with_retry_after_holds_the_feed_back(catalog, sink):
    catalog.configure(retry_interval="100ms")
    sink.fault(feed="products", status=429, count=1, retry_after="2")
    catalog.run("UPDATE products SET name = 'slow down' WHERE id = 23")
    t0 = time.monotonic()
    wait_until("the hold", lambda: catalog.one("SELECT hold_until > now() FROM cde.feeds WHERE name = 'products'"))
    wait_until("delivery after Retry-After", lambda: name_at_sink(sink, 23) == "slow down", timeout=8)
    assert time.monotonic() - t0 >= 1.5, "sent again before Retry-After elapsed"


def test_timeouts_are_retried(catalog, sink):
    catalog.configure(http_timeout="300ms")
    sink.fault(feed="products", delay_ms=1500, status=200, count=1)
    catalog.run("UPDATE products SET name = 'after timeout' WHERE id = 24")
    wait_until("the timeout recorded", lambda: catalog.one(
        "SELECT error FROM cde.feed_products WHERE key = '24'") == "timeout" or name_at_sink(sink, 24) == "after timeout")
    wait_until("delivery", lambda: name_at_sink(sink, 24) == "after timeout", timeout=10)


def test_refused_connections_are_retried_and_the_endpoint_reloads(catalog, sink):
    catalog.configure(endpoint="http://127.0.0.1:9/ingest")   # nothing listens on port 9
    catalog.run("UPDATE products SET name = 'refused' WHERE id = 25")
    wait_until("connection refused recorded",
               lambda: catalog.one("SELECT error FROM cde.feed_products WHERE key = '25'") == "connection refused")
    assert catalog.one("SELECT status FROM cde_failed_items WHERE key = '25'") == "retrying"
    catalog.configure(endpoint=None)    # back to the sink, without a restart
    wait_until("delivery", lambda: name_at_sink(sink, 25) == "refused", timeout=10)


def test_max_attempts_makes_items_dead_and_retry_failed_revives_them(catalog, sink):
    catalog.configure(max_attempts=2, retry_interval="200ms")
    sink.fault(feed="products", status=500)             # down until cleared
    catalog.run("UPDATE products SET name = 'doomed' WHERE id = 26")
    wait_until("the item dead", lambda: catalog.one("SELECT status FROM cde.feed_products WHERE key = '26'") == "dead")
    assert catalog.one("SELECT attempts FROM cde.feed_products WHERE key = '26'") == 2
    assert catalog.rows("SELECT status, attempts FROM cde_failed_items WHERE key = '26'") == [("dead", 2)]
    sink.clear_faults()
    assert catalog.one("SELECT cde_retry_failed('products')") == 1
    wait_until("delivery on request", lambda: name_at_sink(sink, 26) == "doomed")


def test_resync_resends_unchanged_documents(catalog, sink):
    assert catalog.one("SELECT cde_resync('products', ARRAY['1', '2'])") == 2
    wait_until("both resent", lambda: {"1", "2"} <= {k for r in sink.log("products") for k in r["keys"]})


def test_the_worker_restarts_after_kill_9_and_loses_nothing(catalog, sink):
    old = catalog.worker_pid()
    with kill_worker(catalog) as conn:
        db = Db(conn)
        assert db.worker_pid() != old
        db.run("UPDATE products SET name = 'after crash' WHERE id BETWEEN 30 AND 39")
        wait_until("delivery by the new worker",
                   lambda: all(name_at_sink(sink, k) == "after crash" for k in range(30, 40)), timeout=10)


def test_the_workers_writes_are_counted_for_autovacuum(catalog, sink):
    # The worker's updates of a feed table and its deletes from the queue must reach the
    # cumulative statistics, or autovacuum never sees their dead rows (a background worker
    # reports them itself; it once did not, and a feed table that only delivered changes was
    # never vacuumed).
    def counts():
        return catalog.rows("""SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'cde.feed_products'::regclass),
                                      (SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'cde.queue'::regclass)""")[0]
    updated, deleted = counts()
    catalog.run("UPDATE products SET name = 'counted ' || id WHERE id BETWEEN 40 AND 59")
    wait_until("delivery", lambda: all(name_at_sink(sink, k) == f"counted {k}" for k in range(40, 60)))
    # Collect rewrites the 20 documents and delivery records them: 40 updates, 1 queue row.
    wait_until("the worker's writes counted", lambda: counts()[0] >= updated + 40 and counts()[1] >= deleted + 1, timeout=15)


def test_the_queue_is_read_by_its_index_whatever_its_statistics_say(catalog):
    # A queue fills in seconds and autoanalyze comes a minute later: its statistics are often
    # those of a queue nearly empty, over pages emptied since. Planning by them, a collect read
    # and sorted the whole queue for each slice, and the status views did the same for their
    # samples. Here the queue is analyzed with 30 rows, pg_class then says two rows a page (as
    # measured on the benchmark's cluster), and 20,000 rows are queued: the plans of a collect
    # and of cde_feed_status (auto_explain, nested statements included) must read the queue
    # along its index, in its order: no scan of the whole queue, nor of all the feed's rows (a
    # bitmap scan) to sort them.
    catalog.configure(pause="on")
    with connect() as conn:
        plans = []
        conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        with conn.transaction(force_rollback=True):
            def queue(n):
                conn.execute(f"INSERT INTO cde.queue (feed, keys) SELECT 'products', ARRAY[(i % 200 + 1)::text] FROM generate_series(1, {n}) AS i")
            queue(30)
            conn.execute("ANALYZE cde.queue")
            conn.execute("UPDATE pg_class SET reltuples = 5732, relpages = 2841 WHERE oid = 'cde.queue'::regclass")
            queue(20000)
            conn.execute("LOAD 'auto_explain'")
            for setting, value in [("log_min_duration", "0"), ("log_nested_statements", "on"), ("log_level", "notice")]:
                conn.execute(f"SET LOCAL auto_explain.{setting} = {value}")
            assert conn.execute("SELECT queued_changes FROM cde_feed_status WHERE feed = 'products'").fetchone()[0] == 20030
            assert conn.execute("SELECT drained FROM cde._collect('products')").fetchone()[0] > 0
    reads = [p for p in plans if re.search(r"\bon queue\b|queue_feed_id", p)]
    assert reads, "no plan read the queue"
    assert not [p for p in reads if re.search(r"(Seq|Bitmap Heap) Scan on queue\b", p)], "\n\n".join(reads)


def private_mb(pid):
    """The process's private (anonymous) resident memory, in MB: its heap, not the shared buffers."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^RssAnon:\s+(\d+) kB", status, re.M).group(1)) / 1024


def test_an_idle_worker_gives_back_the_memory_a_burst_freed(db, sink):
    # glibc keeps the memory a process freed, to use again: after delivering a burst of changes
    # the worker's heap stayed at its high-water mark for good (after a million changes, 44 MB of
    # private memory against 19 before). Before it sleeps it gives the free memory back to the
    # system (at most every 5 s): once the burst is delivered, most of what it took is given back.
    # Measured against the peak, not the start: whether the worker had trimmed already when the
    # test began depends on how long the full sync took.
    fresh_catalog(db, products=30000)
    full_sync_and_wait(db, timeout=120)
    pid = db.worker_pid()
    wait_until("the worker idle", lambda: db.one("SELECT state FROM cde_worker_status") == "idle", timeout=30)
    before = private_mb(pid)
    db.run("UPDATE products SET name = name || repeat('x', 2000)")
    peak = before

    def delivered():
        nonlocal peak
        peak = max(peak, private_mb(pid))
        return db.one("SELECT pending FROM cde_feed_status WHERE feed = 'products'") == 0
    wait_until("the burst delivered", delivered, timeout=120, interval=0.05)
    assert peak > before + 10, f"the burst did not grow the heap ({before:.1f} -> {peak:.1f} MB): the test shows nothing"
    wait_until("at least half of what the burst took given back",
               lambda: private_mb(pid) < peak - (peak - before) / 2, timeout=30, interval=0.2)
    assert db.worker_pid() == pid
