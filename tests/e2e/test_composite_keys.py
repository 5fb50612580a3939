"""Entities keyed by several columns (key_columns), end to end against the real sink: 400,000
(product, store) pairs fully synced with one key per pair, changed pairs collected through the
table's primary key (no sequential scan), a deleted pair delivered as deleted."""

from conftest import fresh_catalog, full_sync_and_wait, wait_until


def scans(db):
    """Sequential scans of store_stock, and rows the worker updated in the feed table (its statistics
    are flushed together: once the updates show, so do the scans made before them)."""
    return db.rows("""SELECT (SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'store_stock'::regclass),
                             (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'cde.feed_store_stock'::regclass)""")[0]


def change(db, sink, store, gone):
    """Ten pairs of a store changed, each by its primary key, and one pair deleted: all at the sink."""
    sink.reset()
    with db.conn.transaction():
        for p in range(1, 11):
            db.run("UPDATE store_stock SET quantity = 1000 WHERE product_id = %s AND store = %s", p, store)
        db.run("DELETE FROM store_stock WHERE product_id = %s AND store = 'berlin'", gone)
    wait_until("the ten pairs and the deletion at the sink", lambda: len(sink.docs("store_stock")) == 11)
    docs = sink.docs("store_stock")
    assert all(docs[f"{p}|{store}"]["data"]["quantity"] == 1000 for p in range(1, 11))
    assert docs[f"{gone}|berlin"]["deleted"]
    assert sink.stats()["items_received"] == 11


def test_a_feed_of_400k_pairs(db, sink):
    fresh_catalog(db, products=10)
    db.run("DROP TABLE IF EXISTS store_stock")
    db.run("CREATE TABLE store_stock (product_id int, store text, quantity int NOT NULL, PRIMARY KEY (product_id, store))")
    db.run("""INSERT INTO store_stock SELECT p, s, p % 50
                FROM generate_series(1, 100000) AS p, unnest('{berlin,paris,lyon,a|b}'::text[]) AS s""")
    db.run("ANALYZE store_stock")
    db.run("""SELECT cde_register_feed('store_stock', 'SELECT product_id, store, quantity FROM store_stock',
                                       key_columns => '{product_id,store}')""")
    db.run("SELECT cde_track('store_stock', 'store_stock')")
    full_sync_and_wait(db, "store_stock", timeout=180)
    wait_until("400,000 pairs at the sink", lambda: len(sink.docs("store_stock")) == 400000, timeout=60)
    docs = sink.docs("store_stock")
    assert docs["7|paris"]["data"] == {"product_id": 7, "store": "paris", "quantity": 7}
    assert docs["7|a%7Cb"]["data"]["store"] == "a|b"   # "|" in a value is escaped in the key

    # Changed pairs are read through the primary key: no sequential scan of the 400,000 rows. The
    # first round flushes the worker's statistics of the sync; the second is measured.
    _, updated = scans(db)
    change(db, sink, "lyon", 99)
    wait_until("the worker's statistics of the first round", lambda: scans(db)[1] >= updated + 22, timeout=15)
    seq_before, updated = scans(db)
    change(db, sink, "paris", 98)
    wait_until("the worker's statistics of the second round", lambda: scans(db)[1] >= updated + 22, timeout=15)
    assert scans(db)[0] == seq_before, "a sequential scan of store_stock while collecting ten pairs"
