"""Trust, against the real worker (docs/security.md): what a database owner, a delegated admin and
a monitor can do to the superuser worker, tried as those roles themselves. Each attack must fail,
and delivery must go on."""

import os
import tempfile
from pathlib import Path

import psycopg
import pytest

from conftest import PORT, SERVER_LOG, SOCKET, Db, connect, full_sync_and_wait, wait_until


def login(role, dbname="cde"):
    return psycopg.connect(host=SOCKET, port=PORT, user=role, dbname=dbname, autocommit=True)


def restart_worker(db):
    """Terminate the worker; the postmaster starts a new one, whose session takes the database's
    settings anew."""
    old = db.worker_pid()
    db.run("SELECT pg_terminate_backend(%s)", old)
    wait_until("a new worker", lambda: db.one("SELECT pid FROM cde_worker_status WHERE running") not in (None, old),
               timeout=30, interval=0.2)


def name_at_sink(sink, key, feed="products"):
    doc = sink.doc(feed, key)
    return doc["data"].get("name") if doc and doc.get("data") else None


@pytest.fixture
def roles(db):
    names = ["cde_e2e_owner", "cde_e2e_admin", "cde_e2e_monitor"]
    db.run("SET client_min_messages = warning")
    for r in names:
        db.run(f"DROP OWNED BY {r}") if db.one("SELECT 1 FROM pg_roles WHERE rolname = %s", r) else None
        db.run(f"DROP ROLE IF EXISTS {r}")
    db.run("CREATE ROLE cde_e2e_owner LOGIN")
    db.run("CREATE ROLE cde_e2e_admin LOGIN")
    db.run("CREATE ROLE cde_e2e_monitor LOGIN IN ROLE pg_monitor")
    yield names
    db.run("ALTER DATABASE cde RESET ALL")
    db.run("ALTER DATABASE cde OWNER TO postgres")
    for r in names:
        db.run(f"DROP OWNED BY {r}")
        db.run(f"DROP ROLE {r}")


def test_a_hostile_database_owner_changes_nothing_the_worker_runs(catalog, sink, roles):
    """The database's owner shadows pg_catalog's functions and operators with its own, which make
    it a superuser when a superuser runs them, and sets timeouts and read-only transactions on
    the database. The restarted worker's session takes none of it, and delivery goes on."""
    db = catalog
    db.run("ALTER DATABASE cde OWNER TO cde_e2e_owner")
    with login("cde_e2e_owner") as conn:
        owner = Db(conn)
        owner.run("CREATE SCHEMA evil")
        owner.run("CREATE TABLE evil.calls (fn text, who name)")
        owner.run("GRANT USAGE ON SCHEMA evil TO PUBLIC")
        owner.run("GRANT INSERT ON evil.calls TO PUBLIC")
        owner.run("""CREATE FUNCTION evil.grab(fn text) RETURNS void LANGUAGE plpgsql AS $$
                     BEGIN
                         INSERT INTO evil.calls VALUES (fn, current_user);
                         BEGIN EXECUTE 'ALTER ROLE cde_e2e_owner SUPERUSER';
                         EXCEPTION WHEN insufficient_privilege THEN NULL; END;
                     END $$""")
        for name, args, call in [("now", "", "pg_catalog.now()"),
                                 ("cardinality", "anyarray", "pg_catalog.cardinality($1)"),
                                 ("array_length", "anyarray, int", "pg_catalog.array_length($1, $2)"),
                                 ('"left"', "text, int", 'pg_catalog."left"($1, $2)'),
                                 ("coalesce_shadow", "text, text", "$1 = $2")]:
            rettype = {"now": "timestamptz", "cardinality": "int", "array_length": "int", '"left"': "text",
                       "coalesce_shadow": "boolean"}[name]
            owner.run(f"""CREATE FUNCTION evil.{name}({args}) RETURNS {rettype} LANGUAGE plpgsql AS $$
                          BEGIN PERFORM evil.grab('{name}'); RETURN {call}; END $$""")
        owner.run("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.coalesce_shadow)")
        owner.run("ALTER DATABASE cde SET search_path = evil, pg_catalog, public")
        owner.run("ALTER DATABASE cde SET statement_timeout = '1ms'")
        owner.run("ALTER DATABASE cde SET lock_timeout = '1ms'")
        owner.run("ALTER DATABASE cde SET idle_in_transaction_session_timeout = '1ms'")
        owner.run("ALTER DATABASE cde SET default_transaction_read_only = on")
        owner.run("ALTER DATABASE cde SET default_transaction_isolation = 'serializable'")
    restart_worker(db)

    db.run("UPDATE products SET name = 'after the owner' WHERE id = 3")
    db.run("UPDATE categories SET name = name || ' (renamed)' WHERE id = 1")
    wait_until("the change delivered by the new worker", lambda: name_at_sink(sink, 3) == "after the owner", timeout=15)
    assert db.one("SELECT count(*) FROM evil.calls") == 0, db.rows("SELECT * FROM evil.calls")
    assert db.one("SELECT rolsuper FROM pg_roles WHERE rolname = 'cde_e2e_owner'") is False
    log = SERVER_LOG.read_text()
    assert "cde: the worker ignores these settings of its database or role:" in log and "lock_timeout" in log
    assert db.one("SELECT running FROM cde_worker_status") is True
    db.run("ALTER DATABASE cde RESET ALL")
    restart_worker(db)


def test_a_delegated_admin_gains_nothing_through_the_worker(catalog, sink, roles):
    """A delegated admin's feed calls its own function, which tries to make it a superuser; the
    admin starts a full sync, which the worker and the sync builders (superusers) run, and
    delivers a change. The function only ever runs as the admin."""
    db = catalog
    db.run("SELECT cde_grant_admin('cde_e2e_admin')")
    db.run("CREATE SCHEMA admin_own AUTHORIZATION cde_e2e_admin")
    db.run("GRANT SELECT, TRIGGER ON products TO cde_e2e_admin")
    with login("cde_e2e_admin") as conn:
        admin = Db(conn)
        admin.run("CREATE TABLE admin_own.seen (who name)")
        admin.run("""CREATE FUNCTION admin_own.probe() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
                     BEGIN
                         INSERT INTO admin_own.seen VALUES (current_user);
                         BEGIN EXECUTE 'ALTER ROLE cde_e2e_admin SUPERUSER';
                         EXCEPTION WHEN insufficient_privilege THEN NULL; END;
                         RETURN true;
                     END $$""")
        admin.run("""SELECT cde_register_feed('admin_products',
                         'SELECT id, name FROM products WHERE admin_own.probe()', search_path => '{public}')""")
        admin.run("SELECT cde_track('admin_products', 'products')")
        admin.run("SELECT cde_track('admin_products', 'products', 'CASE WHEN admin_own.probe() THEN id END')")
        run = admin.one("SELECT cde_full_sync('admin_products')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.run("UPDATE cde.feeds SET source_query = 'SELECT 1 AS id' WHERE name = 'admin_products'")
    wait_until("the admin's full sync", lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished",
               timeout=60)
    db.run("UPDATE products SET name = 'seen by the admin feed' WHERE id = 5")
    wait_until("the change", lambda: name_at_sink(sink, 5, "admin_products") == "seen by the admin feed")
    assert db.rows("SELECT DISTINCT who FROM admin_own.seen") == [("cde_e2e_admin",)]
    assert db.one("SELECT rolsuper FROM pg_roles WHERE rolname = 'cde_e2e_admin'") is False
    db.run("SELECT cde_drop_feed('admin_products')")


def test_a_monitor_sees_the_views_and_no_key(catalog, sink, roles):
    """The key set in the server's configuration (ALTER SYSTEM) is used by the worker and shown to
    nobody: not SHOW, current_setting() or pg_settings for a pg_monitor member, nor the running
    queries of pg_stat_activity."""
    db = catalog
    key = "k-" + os.urandom(8).hex()
    sink.call("POST", "/_sink/api-key", key.encode())
    db.configure(api_key=key)
    db.run("UPDATE products SET name = 'authorised' WHERE id = 7")
    wait_until("the authorised change", lambda: name_at_sink(sink, 7) == "authorised")
    with login("cde_e2e_monitor") as conn:
        mon = Db(conn)
        assert mon.one("SHOW cde.api_key") == "********"
        assert mon.one("SELECT current_setting('cde.api_key')") == "********"
        assert mon.one("SELECT count(*) FROM pg_settings WHERE name = 'cde.api_key'") == 0
        assert mon.one("SELECT count(*) FROM pg_settings WHERE setting LIKE %s OR reset_val LIKE %s", f"%{key}%", f"%{key}%") == 0
        assert mon.one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s", f"%{key}%") == 0
        assert mon.one("SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE %s", f"%{key}%") == 0
        assert mon.one("SELECT count(*) FROM cde_feed_status") >= 1
        assert mon.one("SELECT running FROM cde_worker_status") is True
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            mon.run("SELECT doc FROM cde.feed_products LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            mon.run("SELECT * FROM pg_file_settings")
    assert db.one("SHOW cde.api_key") == "********"   # a superuser is shown the mask too
