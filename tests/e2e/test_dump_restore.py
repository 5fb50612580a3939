"""A dump and a restore give a working copy: cde's configuration and state (feeds, tracks, feed
tables with their delivery state, retries, sync history) come back with the data, the capture
triggers with them, no raw OID anywhere; writes in the copy are captured and delivered (here by
CALL cde_deliver(), the worker serving its own database only). Custom format and plain SQL."""

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from conftest import PG_BIN, PORT, SOCKET, Db, connect, full_sync_and_wait, wait_until

BIN = PG_BIN


def pg(tool, *args):
    cmd = [str(BIN / tool), "-h", SOCKET, "-p", str(PORT), "-U", "postgres", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def state(db):
    """What a copy must have, in names (no OID)."""
    return {
        "feeds": db.rows("SELECT name, source_query, key_columns, key_types::text, mode, depends_on, owner::text, feed_table::text,"
                         " destination FROM cde.feeds ORDER BY name"),
        "destinations": db.rows("SELECT name, endpoint, options::text FROM cde.destinations ORDER BY name"),
        "tracks": db.rows("SELECT feed, source_table::text, keys FROM cde.tracks ORDER BY 1, 2"),
        "products": db.rows("SELECT status, count(*) FROM cde.feed_products GROUP BY 1 ORDER BY 1"),
        "retries": db.one("SELECT count(*) FROM cde.retries"),
        "runs": db.rows("SELECT status, feeds FROM cde.sync_runs ORDER BY id"),
        "events": db.one("SELECT count(*) FROM cde.sync_events"),
        "triggers": db.rows("SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE tgname LIKE 'cde\\_capture%%' ORDER BY 1, 2"),
        "count_triggers": db.one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cde\\_count\\_%%'"),
    }


@pytest.mark.parametrize("fmt", ["custom", "plain"])
def test_a_dump_restored_into_a_new_database_is_a_working_copy(catalog, sink, tmp_path, fmt):
    db = catalog
    # Some state beyond the feeds: an item retrying (a 503), the catalog fixture's finished run.
    sink.fault(feed="products", status=503, count=1)
    db.run("UPDATE products SET name = 'retry me' WHERE id = 2")
    wait_until("the retry", lambda: db.one("SELECT count(*) FROM cde.retries") == 1)
    # A destination of its own for one feed (its row refers to it: restored in that order).
    db.run("SELECT cde_set_destination('copied', current_setting('cde.endpoint'), '{\"headers\": {\"X-Copy\": \"1\"}}')")
    db.run("""SELECT cde_register_feed(name, source_query, NULL, mode, depends_on, batch_size, destination => 'copied',
                                     key_columns => key_columns)
                FROM cde.feeds WHERE name = 'categories'""")
    before = state(db)
    assert before["retries"] == 1 and before["runs"] and before["triggers"]
    counted = lambda c: c.rows("SELECT s.feed, s.items, s.sent, s.retrying FROM cde_feed_status s ORDER BY 1")
    before_counted = counted(db)
    assert ("products", *db.rows("""SELECT count(*), count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'retrying')
                                      FROM cde.feed_products""")[0]) in before_counted
    assert [d[0] for d in before["destinations"]] == ["copied", "default"]

    copy = f"cde_copy_{fmt}"
    db.run(f"DROP DATABASE IF EXISTS {copy}")
    dump = tmp_path / f"cde.{fmt}"
    os.chmod(tmp_path, 0o755)
    if fmt == "custom":
        pg("pg_dump", "-Fc", "-f", str(dump), "cde")
        pg("createdb", copy)
        pg("pg_restore", "--exit-on-error", "-d", copy, str(dump))
    else:
        pg("pg_dump", "-Fp", "-f", str(dump), "cde")
        pg("createdb", copy)
        pg("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", copy, "-f", str(dump))

    with psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname=copy, autocommit=True) as conn:
        c = Db(conn)
        assert state(c) == before

        # Writes are captured in the copy, and delivered from it (to the same endpoint: see
        # docs/operations.md, "Dump and restore", to keep a copy quiet).
        c.run("UPDATE products SET name = %s WHERE id = 3", f"from the {fmt} copy")
        assert c.one("SELECT count(*) FROM cde.queue WHERE feed = 'products'") == 1
        c.run("CALL cde_deliver('products')")
        assert (sink.doc("products", 3) or {}).get("data", {}).get("name") == f"from the {fmt} copy"
        # The views' counts are not dumped: the copy counts its feed tables once, at the
        # housekeeping pass of its worker or of CALL cde_deliver() (the test cluster serves only
        # database cde), then its triggers count every write.
        agree = """SELECT (s.items, s.sent, s.retrying) = (SELECT count(*), count(*) FILTER (WHERE status = 'sent'),
                                                            count(*) FILTER (WHERE status = 'retrying') FROM cde.feed_products)
                     FROM cde_feed_status s WHERE s.feed = 'products'"""
        assert c.one(agree) and c.one("SELECT items > 0 FROM cde_feed_status WHERE feed = 'products'")
        c.run("DELETE FROM products WHERE id = 4")
        c.run("CALL cde_deliver('products')")
        assert c.one(agree)
        # Re-tracking in the copy leaves nothing orphaned.
        c.run("SELECT cde_track('products', 'products')")
        assert state(c)["triggers"] == before["triggers"]
    db.run(f"DROP DATABASE {copy}")
