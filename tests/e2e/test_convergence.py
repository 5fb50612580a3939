"""Nothing lost: concurrent writers on the sample catalog while the sink and the worker misbehave,
then quiesce and check that the sink holds exactly what the database holds.

Bounded here (CDE_SOAK_SECONDS, default 20 seconds of writes); `scripts/soak MINUTES` runs the same
test for longer. Figures are printed at the end (pytest -s shows them; scripts/soak does)."""

import os
import random
import subprocess
import threading
import time

import psycopg

from conftest import Db, fresh_catalog, full_sync_and_wait, kill_worker, reconnect, restart_postgres, wait_until

SECONDS = float(os.environ.get("CDE_SOAK_SECONDS", "20"))
PRODUCTS = 2000
# Items whose SKU contains this are rejected by the sink: they must end up exactly the rejected ones.
POISON = "POISON"
LEDGER = 300


class Writer(threading.Thread):
    """One application connection making the kinds of writes a shop makes, until told to stop."""

    def __init__(self, n, stop, stats):
        super().__init__(daemon=True)
        self.rng = random.Random(n)
        self.stop = stop
        self.stats = stats
        self.n = n

    def run(self):
        while not self.stop.is_set():
            try:
                with psycopg.connect(**_conninfo()) as conn:
                    # The test cluster runs with synchronous_commit = off (CDE_CLUSTER_FAST): an
                    # immediate restart can then undo a writer's commit that cde had already
                    # delivered (docs/nothing-lost.md). The shop's writers commit durably.
                    conn.execute("SET synchronous_commit = on")
                    while not self.stop.is_set():
                        self.one_transaction(conn)
            except psycopg.Error:
                time.sleep(0.2)   # the cluster restarts after a worker crash: reconnect

    def one_transaction(self, conn):
        r = self.rng
        pid = r.randint(1, PRODUCTS + 200)
        kind = r.random()
        with conn.transaction() as tx:
            cur = conn.cursor()
            if r.random() < 0.15:
                # The partitioned ledger, naming the parent or the row's partition.
                lid = r.randint(1, LEDGER)
                table = r.choice(["ledger", f"ledger_{lid % 3}"])
                cur.execute(f"UPDATE {table} SET amount = %s WHERE id = %s", (round(r.uniform(1, 99), 2), lid))
            elif kind < 0.35:
                cur.execute("UPDATE products SET name = %s WHERE id = %s", (f"w{self.n}-{r.random():.6f}", pid))
            elif kind < 0.45:
                lo = r.randint(1, PRODUCTS)
                cur.execute("UPDATE products SET description = %s WHERE id BETWEEN %s AND %s", (f"bulk {r.random()}", lo, lo + 40))
            elif kind < 0.55:
                cur.execute("UPDATE prices SET amount = %s WHERE product_id = %s", (round(r.uniform(1, 999), 2), pid))
            elif kind < 0.62:
                cur.execute("UPDATE categories SET name = %s WHERE id = %s", (f"cat {r.random():.5f}", r.randint(1, 40)))
            elif kind < 0.72:
                # Inserts (re)create ids that deletes remove, so that a long soak keeps a full catalog.
                cur.execute("INSERT INTO products (id, sku, name, category_id) VALUES (%s, %s, 'new', 1) ON CONFLICT (id) DO NOTHING",
                            (pid, f"NEW-{self.n}-{r.random()}"))
            elif kind < 0.76:
                cur.execute("DELETE FROM products WHERE id = %s", (pid,))
            elif kind < 0.80:
                cur.execute("UPDATE products SET sku = %s WHERE id = %s", (f"{POISON}-{pid}-{r.random()}", pid))
            elif kind < 0.84:
                cur.execute("UPDATE products SET sku = %s WHERE id = %s", (f"CLEAN-{pid}-{r.random()}", pid))
            elif kind < 0.88:
                # A long transaction that commits after later ones.
                cur.execute("UPDATE products SET name = %s WHERE id = %s", (f"long {r.random()}", pid))
                time.sleep(r.uniform(0.2, 1.0))
            elif kind < 0.94:
                cur.execute("UPDATE product_attributes SET value = %s WHERE product_id = %s", (f"v{r.random():.4f}", pid))
            else:
                cur.execute("UPDATE products SET name = 'rolled back' WHERE id = %s", (pid,))
                raise psycopg.Rollback(tx)
            self.stats["writes"] += 1
        time.sleep(r.uniform(0, 0.01))


class Syncer(threading.Thread):
    """Full syncs of every feed, one after the other, during the writes and the faults: their
    builders send what changed while collects send the same keys' changes (docs/nothing-lost.md,
    "Full syncs sent by builders")."""

    def __init__(self, stop, stats):
        super().__init__(daemon=True)
        self.stop = stop
        self.stats = stats

    def run(self):
        while not self.stop.is_set():
            try:
                with psycopg.connect(**_conninfo()) as conn:
                    while not self.stop.is_set():
                        busy = conn.execute("SELECT count(*) FROM cde_sync_runs WHERE finished_at IS NULL").fetchone()[0]
                        if not busy:
                            conn.execute("SELECT cde_full_sync()")
                            self.stats["full_syncs"] += 1
                        time.sleep(0.5)
            except psycopg.Error:
                time.sleep(0.2)   # a restart, or a run started meanwhile by nobody else: again


def _conninfo():
    from conftest import SOCKET, PORT
    return dict(host=SOCKET, port=PORT, user="postgres", dbname="cde", autocommit=True)


def inject_faults(db_holder, sink, stop, stats, rng):
    """Every half second, one fault: the sink failing in each way, a kill -9 of the worker, an
    immediate PostgreSQL restart, the endpoint switched away and back."""
    faults = [
        {"status": 500, "count": 3}, {"status": 503, "count": 2}, {"status": 429, "count": 1, "retry_after": "1"},
        {"delay_ms": 2500, "count": 1}, {"close": True, "count": 2}, {"garbage": True, "count": 1},
        {"status": 502, "count": 1, "body": "<html>bad gateway"},
    ]
    # The worker is killed at a third of the run and PostgreSQL restarted at two thirds (and, in a
    # long soak, every five minutes after); at half, the sink asks for a key the worker does not
    # have (401: the destination is held, nothing rejected) for a second; the rest of the time the
    # sink fails or the endpoint moves.
    next_kill = SECONDS / 3
    next_restart = 2 * SECONDS / 3
    next_unauthorized = SECONDS / 2
    while not stop.is_set():
        time.sleep(0.5)
        elapsed = time.monotonic() - stats["t0"]
        try:
            if elapsed >= next_kill:
                db_holder[0] = Db(kill_worker(db_holder[0]).__enter__())
                stats["worker_kills"] += 1
                next_kill += 300
            elif elapsed >= next_unauthorized:
                sink.call("POST", "/_sink/api-key", b"rotated")
                time.sleep(1.0)
                sink.call("POST", "/_sink/api-key", b"")
                stats["unauthorized_phases"] += 1
                next_unauthorized += 300
            elif elapsed >= next_restart:
                restart_postgres("immediate")
                db_holder[0] = Db(reconnect())
                stats["postgres_restarts"] += 1
                next_restart += 300
            elif rng.random() < 0.85:
                sink.fault(**rng.choice(faults))
            else:
                db_holder[0].configure(endpoint="http://127.0.0.1:9/ingest")
                time.sleep(0.7)
                db_holder[0].configure(endpoint=None)
                stats["endpoint_switches"] += 1
        except (psycopg.Error, AssertionError, subprocess.CalledProcessError):
            db_holder[0] = Db(reconnect())
        stats["faults"] += 1


def test_the_sink_converges_to_the_database(db, sink):
    fresh_catalog(db, products=PRODUCTS)
    db.run("DROP TABLE IF EXISTS ledger CASCADE")
    db.run("CREATE TABLE ledger (id int, part int, amount numeric, PRIMARY KEY (id, part)) PARTITION BY LIST (part)")
    for p in range(3):
        db.run(f"CREATE TABLE ledger_{p} PARTITION OF ledger FOR VALUES IN ({p})")
    db.run("INSERT INTO ledger SELECT g, g %% 3, g FROM generate_series(1, %s) g", LEDGER)
    db.run("SELECT cde_register_feed('ledger', 'SELECT id, part, amount FROM ledger')")
    db.run("SELECT cde_track('ledger', 'ledger')")
    db.configure(http_timeout="1s", retry_interval="500ms", batch_size=100)
    full_sync_and_wait(db)
    sink.fault(reject={"contains": POISON, "error": "poisoned sku"})
    base_requests = sink.stats()["requests"]

    stats = {"writes": 0, "faults": 0, "worker_kills": 0, "postgres_restarts": 0, "endpoint_switches": 0,
             "unauthorized_phases": 0, "full_syncs": 0, "t0": time.monotonic()}
    stop = threading.Event()
    writers = [Writer(n, stop, stats) for n in range(4)] + [Syncer(stop, stats)]
    holder = [db]
    chaos = threading.Thread(target=inject_faults, args=(holder, sink, stop, stats, random.Random(42)), daemon=True)
    for w in writers:
        w.start()
    chaos.start()
    time.sleep(SECONDS)
    stop.set()
    for t in writers + [chaos]:
        t.join(timeout=30)

    # Quiesce: the sink is healthy again (the poison rule stays), the endpoint is back.
    sink.clear_faults()
    sink.fault(reject={"contains": POISON, "error": "poisoned sku"})
    with reconnect() as conn:
        db = Db(conn)
        db.configure(endpoint=None, retry_interval="200ms")
        wait_until("the last full sync to end", lambda: db.one(
            "SELECT count(*) FROM cde_sync_runs WHERE finished_at IS NULL") == 0, timeout=120, interval=0.5)
        wait_until("every feed quiet (nothing pending or retrying)", lambda: db.one(
            "SELECT coalesce(sum(pending + retrying), 0) FROM cde_feed_status") == 0, timeout=120, interval=0.5)

        lost, checked, rejected_ok = 0, 0, 0
        for feed, query in db.rows("SELECT name, source_query FROM cde.feeds ORDER BY name"):
            key = db.one("SELECT cde._key_sql(ARRAY(SELECT 's.' || quote_ident(c) FROM unnest(key_columns) AS c)) FROM cde.feeds WHERE name = %s", feed)
            has_doc = db.one("SELECT doc_column FROM cde.feeds WHERE name = %s", feed)
            want = {str(k): d for k, d in db.rows(
                f"SELECT {key}, {'s.doc::jsonb' if has_doc else 'to_jsonb(s)'} FROM ({query}) s")}
            rejected = {k for (k,) in db.rows(f"SELECT key FROM cde.feed_{feed} WHERE status = 'rejected'")}
            poisoned = {k for k, d in want.items() if POISON in str(d)}
            assert rejected == poisoned, f"{feed}: rejected {sorted(rejected ^ poisoned)[:5]}"
            rejected_ok += len(rejected)
            errors = {e for (e,) in db.rows(f"SELECT DISTINCT error FROM cde.feed_{feed} WHERE status = 'rejected'")}
            assert errors <= {"poisoned sku"}, errors
            have = sink.docs(feed)
            for k, d in want.items():
                checked += 1
                if k in poisoned:
                    continue
                got = have.get(k)
                if got is None or got["deleted"] or got["data"] != d:
                    lost += 1
                    print(f"\nlost: feed {feed} key {k}: the database has {d}, the sink {got}; feed table:",
                          db.rows(f"SELECT status, http_status, error, attempts, modified_at, sent_at FROM cde.feed_{feed} WHERE key = %s", k))
            for k, got in have.items():
                if k not in want:
                    checked += 1
                    if not got["deleted"] and k not in rejected:
                        lost += 1  # the source no longer returns it: the sink must have it deleted
                        print(f"\nlost: feed {feed} key {k}: gone from the database, not deleted at the sink; feed table:",
                              db.rows(f"SELECT status, deleted, http_status, error, attempts, modified_at, sent_at FROM cde.feed_{feed} WHERE key = %s", k))
        assert db.one("SELECT count(*) FROM cde.queue") == 0
        assert db.one("SELECT coalesce(sum(dead), 0) FROM cde_feed_status") == 0

    s = sink.stats()
    print(f"\nconvergence: {SECONDS:.0f}s of writes; writes committed {stats['writes']}; "
          f"faults injected {stats['faults']} ({s['faults_injected']} at the sink, {stats['worker_kills']} worker kills, "
          f"{stats['postgres_restarts']} immediate PostgreSQL restarts, "
          f"{stats['endpoint_switches']} endpoint switches, {stats['unauthorized_phases']} 401 phases); "
          f"full syncs {stats['full_syncs']}; requests {s['requests'] - base_requests}; "
          f"items delivered {s['items_received']}; duplicate requests {s['duplicate_requests']}; "
          f"keys checked {checked}; rejected as expected {rejected_ok}; items lost {lost}")
    assert stats["writes"] > 100
    assert stats["unauthorized_phases"] >= 1
    assert stats["full_syncs"] >= 1
    assert lost == 0
