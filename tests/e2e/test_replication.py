"""Tables written by logical replication (a PIM publishing into the catalog database): the apply
worker writes with session_replication_role = replica and fires row triggers only, so a track
captures those writes when it asks (cde_track(..., replicated => true)) and not otherwise. A real
publication in another database of the test cluster, a real subscription in this one."""

import pytest

from conftest import PORT, Db, connect, fresh_catalog, wait_until


@pytest.fixture
def pim(db):
    """Database pim publishing stock (keyed by product and store) and notes; this database
    holding the same tables, with cde tracking stock for replicated writes and notes not."""
    fresh_catalog(db, products=10)
    assert db.one("SHOW wal_level") == "logical", "the test cluster is made with wal_level = logical (scripts/cluster)"
    db.run("DROP SUBSCRIPTION IF EXISTS pim_sub")
    db.run("DROP DATABASE IF EXISTS pim WITH (FORCE)")
    db.run("CREATE DATABASE pim")
    conn = connect("pim")
    p = Db(conn)
    for d in (p, db):
        d.run("DROP TABLE IF EXISTS stock, notes")
        d.run("CREATE TABLE stock (product_id int, store text, quantity int NOT NULL, PRIMARY KEY (product_id, store))")
        d.run("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    p.run("INSERT INTO stock SELECT g, s, g FROM generate_series(1, 50) AS g, unnest('{berlin,paris}'::text[]) AS s")
    p.run("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 5) AS g")
    p.run("CREATE PUBLICATION pim_pub FOR TABLE stock, notes")
    # A subscription to a database of the same cluster: its slot is made first (CREATE
    # SUBSCRIPTION would wait for itself otherwise).
    p.run("SELECT pg_create_logical_replication_slot('pim_sub', 'pgoutput')")
    db.run("SELECT cde_register_feed('stock', 'SELECT product_id, store, quantity FROM stock', key_columns => '{product_id,store}')")
    db.run("SELECT cde_track('stock', 'stock', replicated => true)")
    db.run("SELECT cde_register_feed('notes', 'SELECT id, body FROM notes')")
    db.run("SELECT cde_track('notes', 'notes')")
    db.run(f"""CREATE SUBSCRIPTION pim_sub CONNECTION 'host=127.0.0.1 port={PORT} dbname=pim user=postgres'
               PUBLICATION pim_pub WITH (create_slot = false, slot_name = 'pim_sub')""")
    yield p
    db.run("DROP SUBSCRIPTION IF EXISTS pim_sub")
    conn.close()
    db.run("DROP DATABASE IF EXISTS pim WITH (FORCE)")
    db.run("DROP TABLE IF EXISTS stock, notes")


def test_replicated_writes_are_captured_when_asked(db, sink, pim):
    # The initial copy of the subscription: every pair delivered; the notes copied, not captured.
    wait_until("the copy of stock delivered", lambda: len(sink.docs("stock")) == 100, timeout=30)
    wait_until("the notes copied", lambda: db.one("SELECT count(*) FROM notes") == 5, timeout=30)
    assert sink.doc("stock", "7|paris")["data"] == {"product_id": 7, "store": "paris", "quantity": 7}

    # Changes made in the PIM: an update, an insert, a deletion, applied by replication.
    pim.run("UPDATE stock SET quantity = 700 WHERE product_id = 7 AND store = 'paris'")
    pim.run("INSERT INTO stock VALUES (51, 'lyon', 51)")
    pim.run("DELETE FROM stock WHERE product_id = 8 AND store = 'berlin'")
    pim.run("UPDATE notes SET body = 'changed' WHERE id = 1")
    wait_until("the replicated update", lambda: (sink.doc("stock", "7|paris") or {}).get("data", {}).get("quantity") == 700)
    wait_until("the replicated insert", lambda: sink.doc("stock", "51|lyon") is not None)
    wait_until("the replicated deletion", lambda: (sink.doc("stock", "8|berlin") or {}).get("deleted"))
    wait_until("the note applied", lambda: db.one("SELECT body FROM notes WHERE id = 1") == "changed")

    # Not asked: nothing of notes was captured, though the rows are there.
    assert db.one("SELECT count(*) FROM cde.queue WHERE feed = 'notes'") == 0
    assert db.one("SELECT count(*) FROM cde.feed_notes") == 0
    assert sink.docs("notes") == {}

    # A local write to the same tables is captured once, by the statement triggers.
    sink.reset()
    db.run("UPDATE stock SET quantity = 1 WHERE product_id = 9")
    db.run("UPDATE notes SET body = 'local' WHERE id = 2")
    wait_until("the local writes delivered", lambda: len(sink.docs("stock")) == 2 and sink.doc("notes", 2) is not None)
    assert sink.stats()["items_received"] == 3

    # A replicated TRUNCATE: every pair becomes a deletion.
    pim.run("TRUNCATE stock")
    wait_until("the truncate applied and delivered",
               lambda: db.one("SELECT count(*) FROM cde.feed_stock WHERE NOT deleted OR status <> 'sent'") == 0, timeout=20)
