"""Partitioned and inherited tables, end to end against the real sink: every write arrives, whichever
table it names (the parent, a partition, a sub-partition, an inheritance child), and rows that come
or go by DDL (TRUNCATE, ATTACH, DETACH of a partition with rows, a partition created later) too."""

import pytest

from conftest import fresh_catalog, full_sync_and_wait, wait_until


def amount_at_sink(sink, key):
    doc = sink.doc("payments", key)
    return None if not doc or doc.get("deleted") else float(doc["data"]["amount"])


@pytest.fixture
def payments(db, sink):
    fresh_catalog(db, products=10)
    db.run("DROP TABLE IF EXISTS payment, payment_p2007_04, payment_p2007_05 CASCADE")
    db.run("""CREATE TABLE payment (payment_id int, paid date, amount numeric, PRIMARY KEY (payment_id, paid))
              PARTITION BY RANGE (paid)""")
    db.run("CREATE TABLE payment_p2007_02 PARTITION OF payment FOR VALUES FROM ('2007-02-01') TO ('2007-03-01')")
    db.run("""CREATE TABLE payment_p2007_03 PARTITION OF payment FOR VALUES FROM ('2007-03-01') TO ('2007-04-01')
              PARTITION BY HASH (payment_id)""")
    db.run("CREATE TABLE payment_p2007_03_a PARTITION OF payment_p2007_03 FOR VALUES WITH (MODULUS 2, REMAINDER 0)")
    db.run("CREATE TABLE payment_p2007_03_b PARTITION OF payment_p2007_03 FOR VALUES WITH (MODULUS 2, REMAINDER 1)")
    db.run("INSERT INTO payment SELECT g, '2007-02-01'::date + (g % 50), g FROM generate_series(1, 100) g")
    db.run("""SELECT cde_register_feed('payments',
                  'SELECT payment_id, jsonb_build_object(''id'', payment_id, ''amount'', sum(amount)) AS doc
                     FROM payment GROUP BY payment_id', 'payment_id')""")
    db.run("SELECT cde_track('payments', 'payment')")
    full_sync_and_wait(db, "payments")
    return db


def paid_in(db, key):
    return db.one("SELECT paid::text FROM payment WHERE payment_id = %s", key)


def test_writes_naming_partitions_arrive(payments, sink):
    db = payments
    key_feb = db.one("SELECT payment_id FROM payment_p2007_02 ORDER BY payment_id LIMIT 1")
    key_mar = db.one("SELECT payment_id FROM payment_p2007_03_a ORDER BY payment_id LIMIT 1")
    db.run("UPDATE payment SET amount = 1001 WHERE payment_id = %s", key_feb + 1)           # the parent
    db.run("UPDATE payment_p2007_02 SET amount = 1002 WHERE payment_id = %s", key_feb)      # a partition
    db.run("UPDATE payment_p2007_03 SET amount = 1003 WHERE payment_id = %s", key_mar)      # a sub-partitioned one
    db.run("UPDATE payment_p2007_03_a SET amount = 1004 WHERE payment_id = %s", key_mar + 2)  # a sub-partition
    wait_until("every write", lambda: (amount_at_sink(sink, key_feb + 1), amount_at_sink(sink, key_feb),
                                       amount_at_sink(sink, key_mar)) == (1001, 1002, 1003))
    if db.one("SELECT count(*) FROM payment_p2007_03_a WHERE payment_id = %s", key_mar + 2):
        wait_until("the sub-partition's write", lambda: amount_at_sink(sink, key_mar + 2) == 1004)
    db.run("DELETE FROM payment_p2007_02 WHERE payment_id = %s", key_feb)
    wait_until("the deletion", lambda: (sink.doc("payments", key_feb) or {}).get("deleted") is True)


def test_rows_that_come_and_go_by_ddl_arrive(payments, sink):
    db = payments
    # A partition created after tracking.
    db.run("CREATE TABLE payment_p2007_04 PARTITION OF payment FOR VALUES FROM ('2007-04-01') TO ('2007-05-01')")
    db.run("INSERT INTO payment_p2007_04 VALUES (500, '2007-04-02', 50)")
    wait_until("the later partition's row", lambda: amount_at_sink(sink, 500) == 50)
    # TRUNCATE of a partition: its keys become deletions.
    gone = [r[0] for r in db.rows("SELECT payment_id FROM payment_p2007_03_b")]
    db.run("TRUNCATE payment_p2007_03_b")
    wait_until("the truncated partition's deletions",
               lambda: all((sink.doc("payments", k) or {}).get("deleted") for k in gone), timeout=30)
    # ATTACH of a table with rows, DETACH of one with rows.
    db.run("CREATE TABLE payment_p2007_05 (LIKE payment)")
    db.run("INSERT INTO payment_p2007_05 VALUES (600, '2007-05-03', 60), (601, '2007-05-04', 61)")
    db.run("ALTER TABLE payment ATTACH PARTITION payment_p2007_05 FOR VALUES FROM ('2007-05-01') TO ('2007-06-01')")
    wait_until("the attached rows", lambda: (amount_at_sink(sink, 600), amount_at_sink(sink, 601)) == (60, 61), timeout=30)
    db.run("ALTER TABLE payment DETACH PARTITION payment_p2007_04")
    wait_until("the detached row deleted", lambda: (sink.doc("payments", 500) or {}).get("deleted") is True, timeout=30)
    # And what the sink holds is what the source query returns.
    expected = {str(k): float(a) for k, a in db.rows("SELECT payment_id, sum(amount) FROM payment GROUP BY payment_id")}
    wait_until("convergence", lambda: {k: float(d["data"]["amount"]) for k, d in sink.docs("payments").items()
                                       if not d.get("deleted")} == expected, timeout=30)


def test_writes_naming_an_inheritance_child_arrive(db, sink):
    fresh_catalog(db, products=10)
    db.run("DROP TABLE IF EXISTS item CASCADE")
    db.run("CREATE TABLE item (id int PRIMARY KEY, name text)")
    db.run("CREATE TABLE item_special (note text) INHERITS (item)")
    db.run("SELECT cde_register_feed('items', 'SELECT id, name FROM item')")
    db.run("SELECT cde_track('items', 'item', 'id')")
    db.run("INSERT INTO item VALUES (1, 'plain')")
    db.run("INSERT INTO item_special VALUES (2, 'special', 'x')")
    db.run("UPDATE item_special SET name = 'more special'")
    wait_until("the child's rows", lambda: ((sink.doc("items", 1) or {}).get("data", {}).get("name"),
                                            (sink.doc("items", 2) or {}).get("data", {}).get("name")) == ("plain", "more special"))
