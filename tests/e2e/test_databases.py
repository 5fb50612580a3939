"""Several databases in one cluster: the launcher starts a worker for each database where cde is
installed, each with its own settings (ALTER DATABASE ... SET) and its own endpoint; CREATE
EXTENSION in another database serves it without a restart; DROP DATABASE of a served, busy
database is never refused; too few background worker slots cost sync builders, never a
database's delivery."""

import contextlib
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import ROOT, SERVER_LOG, Db, Sink, connect, reconnect, restart_postgres, start_sink, wait_until

SHOPS = ["cde_shop_a", "cde_shop_b", "cde_shop_c", "cde_shop_d"]
SINK_PORTS = [18791, 18792, 18793, 18794]


@contextlib.contextmanager
def shop(name):
    with connect(name) as conn:
        yield Db(conn)


def cde_processes(db):
    return db.rows("SELECT datname, backend_type FROM pg_stat_activity WHERE backend_type IN ('cde worker', 'cde sync builder') ORDER BY 1, 2")


def workers(db):
    return {d for d, t in cde_processes(db) if t == "cde worker"}


def install(name, sink_port):
    """cde in database `name`, its endpoint the sink on `sink_port`, one tracked feed."""
    with shop(name) as s:
        s.run("SET client_min_messages = warning")
        s.run("CREATE EXTENSION cde")
        s.run("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        s.run("SELECT cde_register_feed('items', 'SELECT id, jsonb_build_object(''name'', name) AS doc FROM items')")
        s.run("SELECT cde_track('items', 'items')")


@pytest.fixture
def shops(db):
    """Four empty databases (a, b, c with cde; d without), each with its own sink, and cde
    serving exactly these and the test database (the regress databases stay out of it)."""
    sinks = [start_sink(port) for port in SINK_PORTS]
    for _, s in sinks:
        s.reset()
    db.run("SET client_min_messages = warning")
    for name in SHOPS:
        db.run(f"DROP DATABASE IF EXISTS {name}")
    db.run(f"ALTER SYSTEM SET cde.database = 'cde, {', '.join(SHOPS)}'")
    db.run("SELECT pg_reload_conf()")
    for name, port in zip(SHOPS, SINK_PORTS):
        db.run(f"CREATE DATABASE {name}")
        db.run(f"ALTER DATABASE {name} SET cde.endpoint = 'http://127.0.0.1:{port}/ingest'")
        db.run(f"ALTER DATABASE {name} SET cde.poll_interval = '200ms'")
    for name, port in zip(SHOPS[:3], SINK_PORTS):
        install(name, port)
    yield [s for _, s in sinks]
    with connect() as conn:   # the test may have restarted the server
        for name in SHOPS:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
    for p, _ in sinks:
        p.terminate()
        p.wait()


def delivered(sink, key, name):
    return (sink.doc("items", key) or {}).get("data", {}).get("name") == name


def test_three_databases_deliver_to_their_own_endpoints_and_a_fourth_joins_without_a_restart(db, shops):
    wait_until("a worker in each shop with cde", lambda: {"cde_shop_a", "cde_shop_b", "cde_shop_c"} <= workers(db))
    # The database without cde has no worker: its probe ended.
    assert "cde_shop_d" not in workers(db)

    # The three deliver at once, each to its own sink, while a writer keeps changing them.
    stop = threading.Event()
    written = {}

    def writer():
        conns = {n: Db(connect(n)) for n in SHOPS[:3]}
        i = 0
        while not stop.is_set():
            i += 1
            for n, c in conns.items():
                c.run("INSERT INTO items VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET name = excluded.name", i % 50, f"{n} {i}")
                written[n] = (i % 50, f"{n} {i}")
            time.sleep(0.01)
        for c in conns.values():
            c.conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until("writes", lambda: len(written) == 3)
        # Meanwhile cde arrives in the fourth database: served without a restart.
        install("cde_shop_d", SINK_PORTS[3])
        with shop("cde_shop_d") as d:
            d.run("INSERT INTO items VALUES (1, 'd one')")
            wait_until("the fourth database delivered", lambda: delivered(shops[3], 1, "d one"), timeout=15)
            assert d.one("SELECT running FROM cde_worker_status") is True
            assert d.one("SELECT database FROM cde_worker_status") == "cde_shop_d"
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    for i, n in enumerate(SHOPS[:3]):
        key, name = written[n]
        wait_until(f"{n}'s last write at its own sink", lambda: delivered(shops[i], key, name), timeout=15)
        # Nothing of another database reached this sink.
        assert all(doc["data"]["name"].startswith(n) for doc in shops[i].docs("items").values())
    # Each database's worker shows in its own status view, with its own settings.
    with shop("cde_shop_b") as b:
        assert b.one("SELECT database FROM cde_worker_status WHERE running") == "cde_shop_b"
        assert b.one("SHOW cde.endpoint") == f"http://127.0.0.1:{SINK_PORTS[1]}/ingest"


def test_a_database_setting_changed_reaches_its_worker_and_no_other(db, shops):
    wait_until("workers", lambda: {"cde_shop_a", "cde_shop_b"} <= workers(db))
    db.run("ALTER DATABASE cde_shop_a SET cde.pause = on")
    db.run("SELECT pg_reload_conf()")
    with shop("cde_shop_a") as a, shop("cde_shop_b") as b:
        wait_until("shop a paused", lambda: a.one("SELECT state FROM cde_worker_status") == "paused (cde.pause)")
        a.run("INSERT INTO items VALUES (7, 'waits')")
        b.run("INSERT INTO items VALUES (7, 'goes')")
        wait_until("shop b delivered", lambda: delivered(shops[1], 7, "goes"))
        assert shops[0].doc("items", 7) is None and a.one("SELECT count(*) FROM cde.queue") == 1
        db.run("ALTER DATABASE cde_shop_a RESET cde.pause")
        db.run("SELECT pg_reload_conf()")
        wait_until("shop a delivered once resumed", lambda: delivered(shops[0], 7, "waits"))


def test_drop_database_of_a_busy_served_database_is_not_refused(db, shops):
    wait_until("workers", lambda: {"cde_shop_a", "cde_shop_c"} <= workers(db))
    # Shop c's worker is inside a request its sink holds for 20 s.
    shops[2].fault(delay_ms=20000)
    with shop("cde_shop_c") as c:
        c.run("INSERT INTO items VALUES (1, 'slow')")
        # Its worker stays in its iteration while the request waits.
        wait_until("shop c's request in flight", lambda: c.one("SELECT state FROM cde_worker_status") == "working", timeout=10)
    t0 = time.monotonic()
    db.run("DROP DATABASE cde_shop_c")   # without FORCE: it would wait 5 s and fail if the worker stayed
    assert time.monotonic() - t0 < 5
    assert db.one("SELECT count(*) FROM pg_database WHERE datname = 'cde_shop_c'") == 0
    wait_until("no cde process for the dropped database", lambda: "cde_shop_c" not in workers(db))
    # The others go on.
    with shop("cde_shop_a") as a:
        a.run("INSERT INTO items VALUES (2, 'after the drop')")
        wait_until("shop a still delivers", lambda: delivered(shops[0], 2, "after the drop"))
    # A failed statement gives the database back: a rename refused still leaves it served.
    with shop("cde_shop_a") as a:
        with pytest.raises(psycopg.errors.ObjectInUse):
            db.run("ALTER DATABASE cde_shop_a RENAME TO cde_shop_x")  # `a` is connected
        wait_until("shop a served again", lambda: "cde_shop_a" in workers(db))
        a.run("INSERT INTO items VALUES (3, 'still here')")
        wait_until("shop a delivers after the refused rename", lambda: delivered(shops[0], 3, "still here"))


def test_too_few_worker_slots_cost_builders_never_a_database(db, shops):
    """max_worker_processes = the background workers running + one: a full sync's builder takes
    the spare slot; when cde is installed in another database, the builder gives its slot up to
    that database's worker, and the full sync finishes without builders."""
    wait_until("workers", lambda: {"cde_shop_a", "cde_shop_b", "cde_shop_c"} <= workers(db))
    served = len(workers(db))
    # Every background worker now (PostgreSQL's logical replication launcher among them), and one.
    running = db.one("SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('cde launcher', 'cde worker', 'logical replication launcher')")
    db.run(f"ALTER SYSTEM SET max_worker_processes = {running + 1}")
    db.run("ALTER SYSTEM SET max_parallel_workers = 0")   # parallel queries take the same slots
    db.run("ALTER SYSTEM SET cde.sync_builders = 2")
    restart_postgres("fast")
    db = Db(reconnect())
    try:
        wait_until("every database's worker after the restart", lambda: len(workers(db)) == served, timeout=30)
        log_start = SERVER_LOG.stat().st_size
        with shop("cde_shop_a") as a:
            # A feed slow to build (about 0.3 ms a row) keeps the builder busy for seconds.
            a.run("INSERT INTO items SELECT g, 'bulk ' || g FROM generate_series(1, 20000) g ON CONFLICT DO NOTHING")
            a.run("""SELECT cde_register_feed('slow', $$SELECT id, jsonb_build_object('name', name, 'slept', pg_sleep(0.0003)::text) AS doc
                                                     FROM items$$)""")
            wait_until("shop a's changes delivered", lambda: a.one("SELECT sum(pending) FROM cde_feed_status") == 0, timeout=120)
            run = a.one("SELECT cde_full_sync('slow')")
            wait_until("a builder at work", lambda: a.one("SELECT sync_builders FROM cde_worker_status") >= 1, timeout=30)
            assert a.one("SELECT sync_builders_wanted FROM cde_worker_status") == 2
            # cde arrives in shop d while the builder holds the last slot.
            install("cde_shop_d", SINK_PORTS[3])
            with shop("cde_shop_d") as d:
                d.run("INSERT INTO items VALUES (9, 'served first')")
                wait_until("shop d delivered", lambda: delivered(shops[3], 9, "served first"), timeout=30)
                # Its worker, not a passing process, serves it (it may still be publishing its start).
                wait_until("shop d's worker running", lambda: d.one("SELECT running FROM cde_worker_status") is True, timeout=5)
            assert a.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "executing"   # shop b did not wait for it
            wait_until("shop a's full sync finished", lambda: a.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished",
                       timeout=180)
        log = SERVER_LOG.read_text()[log_start:]
        # It was the builder's slot that shop d's worker got: it had to wait for it.
        assert "no background worker slot for the worker of database cde_shop_d" in log
    finally:
        for setting in ("max_worker_processes", "max_parallel_workers", "cde.sync_builders"):
            db.run(f"ALTER SYSTEM RESET {setting}")
        restart_postgres("fast")
        reconnect().close()
