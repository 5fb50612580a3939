"""Full sync, run by the background worker: phase order at the sink, resume after the worker is
killed mid-run, and writes made during a run all delivered."""

import os
import threading
import time

import psycopg

from conftest import SERVER_LOG, Db, connect, fresh_catalog, full_sync_and_wait, kill_worker, wait_until


def test_phases_arrive_in_dependency_order(db, sink):
    fresh_catalog(db, products=3000)
    run = full_sync_and_wait(db)
    events = [r[0] for r in db.rows("SELECT status FROM cde.sync_events WHERE run_id = %s ORDER BY at", run)]
    assert events[:3] == ["preparing", "planned", "executing"] and events[-1] == "finished"
    phases = [r[0] for r in db.rows(
        "SELECT feed FROM cde.sync_events WHERE run_id = %s AND message LIKE 'phase started%%' ORDER BY at", run)]
    assert phases == ["attributes", "categories", "products", "prices", "product_relations", "stock"]

    # At the sink: every category arrived before the first product.
    log = sink.log()
    first_product = min(i for i, r in enumerate(log) if r["feed"] == "products")
    last_category = max(i for i, r in enumerate(log) if r["feed"] == "categories")
    assert last_category < first_product
    assert len(sink.docs("products")) == 3000 and len(sink.docs("categories")) == 60
    # Stock, keyed by (product, store): one document per pair, under "<product_id>|<store>".
    assert len(sink.docs("stock")) == 6000
    assert sink.doc("stock", "42|paris")["data"] == {"product_id": 42, "store": "paris", "store_name": "Paris Nord", "quantity": 42 * 7 % 50}

    # A second run sends nothing: everything is unchanged.
    sink.reset()
    run = full_sync_and_wait(db)
    sent, unchanged = db.rows("SELECT sent, unchanged FROM cde_sync_runs WHERE run_id = %s", run)[0]
    assert sent == 0 and unchanged == 3000 + 60 + 20 + 3000 + 1500 + 6000
    assert sink.stats()["items_received"] == 0


def test_a_run_resumes_after_the_worker_is_killed(db, sink):
    fresh_catalog(db, products=60000)
    run = db.one("SELECT cde_full_sync('products')")
    wait_until("the products phase under way",
               lambda: db.one("SELECT (phases->'products'->>'processed')::int FROM cde_sync_runs WHERE run_id = %s", run) >= 5000,
               timeout=60)
    with kill_worker(db) as conn:
        db2 = Db(conn)
        status = db2.rows("SELECT status, processed FROM cde_sync_runs WHERE run_id = %s", run)[0]
        assert status[0] == "executing"
        wait_until(f"run {run} finished after the restart",
                   lambda: db2.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=180)
        processed, planned = db2.rows("SELECT processed, planned FROM cde_sync_runs WHERE run_id = %s", run)[0]
        assert processed == planned == 60000
        wait_until("every product at the sink", lambda: len(sink.docs("products")) == 60000, timeout=60)
        assert db2.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0


def test_writes_during_a_run_are_all_delivered(db, sink):
    fresh_catalog(db, products=30000)
    run = db.one("SELECT cde_full_sync()")
    wait_until("the products phase under way",
               lambda: (db.one("SELECT (phases->'products'->>'processed')::int FROM cde_sync_runs WHERE run_id = %s", run) or 0) >= 5000,
               timeout=60)
    # Writers keep writing: on keys the run has built, and on keys it has not reached yet.
    for i in range(20):
        db.run("UPDATE products SET name = %s WHERE id = %s", f"during {i}", 1 + i * 1499)
    db.run("DELETE FROM products WHERE id IN (2, 29999)")
    db.run("INSERT INTO products (id, sku, name, category_id) VALUES (40000, 'DURING', 'during new', 1)")
    wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=180)
    wait_until("nothing pending", lambda: db.one("SELECT sum(pending) FROM cde_feed_status WHERE mode = 'immediate'") == 0, timeout=30)
    docs = sink.docs("products")
    for i in range(20):
        assert docs[str(1 + i * 1499)]["data"]["name"] == f"during {i}"
    assert docs["2"]["deleted"] is True                     # built and sent, then deleted
    assert docs.get("29999", {"deleted": True})["deleted"]  # deleted before the run reached it
    assert docs["40000"]["data"]["name"] == "during new"



def test_builders_build_a_phase_side_by_side_while_the_worker_sends(db, sink):
    # Building documents and delivering them run in separate processes: the worker starts
    # cde.sync_builders builders (2 by default) for the run's building, the phase is split into
    # as many lanes by a hash of the key, and the builders are gone once nothing is left to build.
    fresh_catalog(db, products=30000)
    run = db.one("SELECT cde_full_sync('products')")
    builders = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cde sync builder'"
    wait_until("two sync builders at work", lambda: db.one(builders) == 2, timeout=30, interval=0.01)
    wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=180)
    wait_until("the builders to exit", lambda: db.one(builders) == 0)
    assert len(sink.docs("products")) == 30000
    # Every key built once, in one of the two lanes, each built to its end.
    assert db.one("SELECT processed FROM cde_sync_runs WHERE run_id = %s", run) == 30000
    assert db.rows("SELECT lane, lanes, done FROM cde.sync_lanes WHERE run_id = %s ORDER BY lane", run) == [(0, 2, True), (1, 2, True)]


def test_a_lane_whose_builder_stopped_is_built_by_another(db, sink):
    # A builder stopped mid-phase (pg_terminate_backend) commits no more of its lane; its lane
    # keeps its last committed chunk as resume point, and another builder (or one the worker
    # starts next) takes it up from there: every key arrives, none is built twice.
    fresh_catalog(db, products=40000)
    run = db.one("SELECT cde_full_sync('products')")
    wait_until("both lanes under way", lambda: db.one(
        "SELECT count(*) FROM cde.sync_lanes WHERE run_id = %s AND feed = 'products' AND cursor_key IS NOT NULL", run) == 2,
        timeout=60, interval=0.01)
    stopped = db.one("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'cde sync builder' LIMIT 1")
    assert stopped
    wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=180)
    assert db.one("SELECT processed FROM cde_sync_runs WHERE run_id = %s", run) == 40000
    assert db.one("SELECT bool_and(done) FROM cde.sync_lanes WHERE run_id = %s", run)
    assert len(sink.docs("products")) == 40000


def test_without_builders_the_worker_builds(db, sink):
    # cde.sync_builders = 0: no builder process; the worker builds between its sends, one lane.
    fresh_catalog(db, products=12000)
    db.configure(sync_builders=0)
    run = db.one("SELECT cde_full_sync('products')")
    seen = set()
    def finished():
        seen.add(db.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'cde sync builder'"))
        return db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished"
    wait_until("the run to finish", finished, timeout=180, interval=0.05)
    assert seen == {0}
    assert len(sink.docs("products")) == 12000
    assert db.rows("SELECT lane, lanes, done FROM cde.sync_lanes WHERE run_id = %s", run) == [(0, 1, True)]


def test_a_full_sync_ends_while_writers_keep_writing(db, sink):
    """A phase ends when what it built is delivered: rows that writers keep changing meanwhile are
    the partial sync's, and do not keep the run going."""
    fresh_catalog(db, products=3000)
    stop = threading.Event()

    def write():
        with connect() as conn:
            i = 0
            while not stop.is_set():
                conn.execute("UPDATE products SET name = %s WHERE id = %s", (f"busy {i}", 1 + i % 3000))
                i += 1
                time.sleep(0.01)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        full_sync_and_wait(db, timeout=60)
    finally:
        stop.set()
        writer.join(timeout=10)


def test_a_change_overtakes_the_documents_a_full_sync_made_pending(db, sink):
    """A destination slower than the builders, which leave what they build to the worker: the
    sync's documents pile up pending, and a change made meanwhile goes out in the next slice,
    not behind them (docs/nothing-lost.md, "Order")."""
    fresh_catalog(db, products=2000)
    db.configure(batch_size=20, sync_builders_send="off")
    sink.fault(feed="products", delay_ms=100)   # 20 items a request: 200 documents a second
    run = db.one("SELECT cde_full_sync('products')")
    wait_until("every document built, the sync's backlog being sent",
               lambda: db.one("SELECT status FROM cde.sync_phases WHERE run_id = %s AND feed = 'products'", run) == "sending"
               and len(sink.log("products")) > 0, timeout=30)
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'pending' AND full_sync") > 1500
    # Product 2000 was built last: in the sync's own order it would go out last, in ten seconds.
    db.run("UPDATE products SET name = 'changed during the sync' WHERE id = 2000")
    wait_until("the change at the sink",
               lambda: (sink.doc("products", 2000) or {}).get("data", {}).get("name") == "changed during the sync", timeout=5)
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'pending' AND full_sync") > 1000
    assert db.one("SELECT full_sync FROM cde.feed_products WHERE key = '2000'") is False
    # The rest follows, each document once.
    sink.clear_faults()
    wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=60)
    docs = sink.docs("products")
    assert len(docs) == 2000 and docs["2000"]["data"]["name"] == "changed during the sync"
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0


def sent_by_builders(db, feed="products"):
    """Rows a sync builder wrote as sent: the worker's deliveries keep the response's x-request-id
    (the sink always gives one), the builders' do not (docs/protocol.md)."""
    return db.one(f"SELECT count(*) FROM cde.feed_{feed} WHERE status = 'sent' AND response_id IS NULL")


def test_builders_send_what_they_build(db, sink):
    """Sync builders write the documents a chunk changes as sent and post them once the chunk has
    committed: the worker reads none of them back and records none (docs/nothing-lost.md, "Full
    syncs sent by builders"). What they send is counted where the worker's deliveries are."""
    fresh_catalog(db, products=30000)
    before = db.one("SELECT requests FROM cde_destinations WHERE name = 'default'")
    run = full_sync_and_wait(db, "products", timeout=180)
    assert len(sink.docs("products")) == 30000
    assert sent_by_builders(db) == 30000
    assert db.one("SELECT count(*) FROM cde.sync_posts") == 0
    assert db.one("SELECT sent FROM cde_sync_runs WHERE run_id = %s", run) == 30000
    wait_until("the builders' counts", lambda: db.one("SELECT sent_total FROM cde_feed_status WHERE feed = 'products'") == 30000)
    assert db.one("SELECT items_sent FROM cde_destinations WHERE name = 'default'") >= 30000
    assert db.one("SELECT requests FROM cde_destinations WHERE name = 'default'") - before >= 30000 // 500
    assert db.one("SELECT documents_sent FROM cde_worker_status") >= 30000


def test_a_builder_that_meets_a_failing_destination_leaves_the_rest_to_the_worker(db, sink):
    """A failed request stops a builder's sending: what it built from then on is written pending,
    and the worker sends it with its retries and backoff. Nothing is lost."""
    fresh_catalog(db, products=30000)
    sink.fault(feed="products", status=503, count=1)
    full_sync_and_wait(db, "products", timeout=180)
    wait_until("nothing pending", lambda: db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0, timeout=60)
    assert len(sink.docs("products")) == 30000
    by_builders = sent_by_builders(db)
    assert 0 < by_builders < 30000
    assert "a sync builder stops sending to destination default" in SERVER_LOG.read_text(errors="replace")
    assert db.one("SELECT requests_failed FROM cde_destinations WHERE name = 'default'") >= 1


def test_items_a_destination_rejects_from_a_builder_are_recorded_by_the_worker(db, sink):
    """A builder writes as sent only what the destination took; an item it rejected is written
    pending, and the worker's send records the rejection."""
    fresh_catalog(db, products=12000)
    sink.fault(feed="products", reject={"key": "77", "error": "no such category"})
    full_sync_and_wait(db, "products", timeout=180)
    wait_until("the rejection recorded", lambda: db.one("SELECT status FROM cde.feed_products WHERE key = '77'") == "rejected", timeout=30)
    assert db.one("SELECT error FROM cde.feed_products WHERE key = '77'") == "no such category"
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'sent'") == 11999
    assert sent_by_builders(db) == 11999


def test_a_change_during_a_builders_send_is_not_overtaken_by_it(db, sink):
    """A builder posting a chunk to a slow destination, and a change made meanwhile to a key of
    that chunk: the worker holds the change back until the builder is done, so that it arrives
    after the builder's older document, not before it."""
    fresh_catalog(db, products=2000)
    db.configure(batch_size=20)
    sink.fault(feed="products", delay_ms=100)   # 20 items a request: 200 documents a second
    run = db.one("SELECT cde_full_sync('products')")
    wait_until("a builder sending", lambda: len(sink.log("products")) > 0, timeout=30)
    # Product 2000 is in the builder's only chunk, being posted: 100 requests, 10 seconds.
    assert db.one("SELECT count(*) FROM cde.sync_posts WHERE '2000' = ANY (keys)") == 1
    db.run("UPDATE products SET name = 'changed during the sync' WHERE id = 2000")
    wait_until("the change collected", lambda: db.one("SELECT status FROM cde.feed_products WHERE key = '2000'") == "pending")

    def held_back_until_done():
        posting, status = db.rows("SELECT EXISTS (SELECT FROM cde.sync_posts WHERE '2000' = ANY (keys)),"
                                  " (SELECT status FROM cde.feed_products WHERE key = '2000')")[0]
        assert not posting or status == "pending", "sent while the builder was still posting its older version"
        return not posting
    wait_until("the builder done with its post", held_back_until_done, timeout=60)
    sink.clear_faults()
    wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=60)
    wait_until("nothing pending", lambda: db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0, timeout=30)
    docs = sink.docs("products")
    assert len(docs) == 2000 and docs["2000"]["data"]["name"] == "changed during the sync"
    assert sent_by_builders(db) >= 1900


def test_a_builder_killed_while_posting_leaves_its_keys_to_the_worker(db, sink):
    """kill -9 of a builder in the middle of its post: its chunk was committed as sent, and its
    row of cde.sync_posts names a backend that is gone after the restart; the keys go again
    (cde._recover_posts), the run resumes, and every document arrives."""
    fresh_catalog(db, products=2000)
    db.configure(batch_size=20)
    sink.fault(feed="products", delay_ms=100)   # the builder's 2000 documents take 10 seconds
    run = db.one("SELECT cde_full_sync('products')")
    pid = wait_until("a builder posting", lambda: db.one(
        "SELECT a.pid FROM cde.sync_posts p JOIN pg_stat_activity a ON a.pid = p.pid AND a.backend_start = p.backend_start"),
        timeout=30)
    old_worker = db.worker_pid()
    os.kill(pid, 9)
    sink.clear_faults()

    def restarted():
        try:
            with connect() as conn:
                return Db(conn).worker_pid() not in (None, old_worker)
        except psycopg.Error:
            return False
    wait_until("a new worker after the crash", restarted, timeout=60, interval=0.2)
    with connect() as conn:
        db = Db(conn)
        wait_until("the run to finish", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=60)
        wait_until("nothing pending", lambda: db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0, timeout=30)
        assert db.one("SELECT count(*) FROM cde.sync_posts") == 0
        assert len(sink.docs("products")) == 2000
    assert "posts of sync builders that stopped before they were done go again" in SERVER_LOG.read_text(errors="replace")
