"""The extension's life around a busy worker: DROP EXTENSION and CREATE EXTENSION again while the
worker is in the middle of an iteration must succeed, every time; signals; stopping while a
request is in flight."""

import ctypes
import os
import signal
import time
from pathlib import Path

from conftest import SERVER_LOG, SOCKET, Db, fresh_catalog, reconnect, restart_postgres, wait_until

LIBC = ctypes.CDLL(None, use_errno=True)
SYS_TGKILL = 234  # x86_64


def test_drop_extension_while_the_worker_is_busy(db, sink):
    # Each round starts a full sync of a catalog large enough to keep the worker iterating, then
    # drops the extension under it (fresh_catalog begins with DROP EXTENSION cde CASCADE). An
    # iteration locks cde's tables in another order than DROP does; without the drop waiting for
    # the iteration, some rounds end in "deadlock detected".
    for round_ in range(12):
        fresh_catalog(db, products=3000)
        db.run("SELECT cde_full_sync()")
        db.run("UPDATE products SET name = name || '!' WHERE id % 7 = 0")
        wait_until(f"round {round_}: the worker to start on the run",
                   lambda: db.one("SELECT status FROM cde_sync_runs") != 'preparing')
    fresh_catalog(db, products=10)
    assert db.one("SELECT count(*) FROM cde_sync_runs") == 0


def test_a_builder_posting_while_cde_is_dropped_says_so(db, sink):
    # DROP EXTENSION while a sync builder's post is out (it waits for the builder's step, not
    # for its request), and CREATE EXTENSION at once: the request comes back to another cde.
    # The builder says so and stops; it neither warns that the post's keys "go again" (they went
    # with the first cde) nor records anything of it in the new one.
    fresh_catalog(db, products=2000)
    db.configure(batch_size=20)
    sink.fault(feed="products", delay_ms=50)   # the 2000 documents take about 5 seconds
    db.run("SELECT cde_full_sync('products')")
    wait_until("a builder posting", lambda: db.one("SELECT count(*) FROM cde.sync_posts") > 0, timeout=30, interval=0.01)
    log_start = SERVER_LOG.stat().st_size
    db.run("DROP EXTENSION cde CASCADE")
    db.run("CREATE EXTENSION cde")
    said = "came back after cde was dropped from this database; it stops, with nothing left to record"
    wait_until("the builder to say its post came back to another cde",
               lambda: said in SERVER_LOG.read_text(errors="replace")[log_start:], timeout=60, interval=0.2)
    assert "could not say what came of its post" not in SERVER_LOG.read_text(errors="replace")[log_start:]
    assert db.one("SELECT requests FROM cde_destinations WHERE name = 'default'") == 0
    sink.clear_faults()
    fresh_catalog(db, products=10)


def sighup_other_threads(pid):
    """SIGHUP every thread of the process but its main one (tgkill: to the thread itself, not to
    the process, which the kernel would hand to whichever thread it likes). How many were hit."""
    hit = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0  # the process is gone; the caller's checks say so
    for tid in tids:
        if int(tid) != pid and LIBC.syscall(SYS_TGKILL, pid, int(tid), signal.SIGHUP) == 0:
            hit += 1
    return hit


def test_signals_never_reach_the_sender_thread(catalog, sink):
    # The worker posts from a second thread. PostgreSQL's signal handlers call into PostgreSQL,
    # which only the main thread may: a SIGHUP (a reload) handled by the sender thread used to
    # abort the worker. Send in many small, slow requests and signal the sender thread itself
    # until everything is delivered; the same worker must have delivered it.
    catalog.configure(batch_size=5)
    pid = catalog.worker_pid()
    sink.fault(feed="products", delay_ms=20)
    catalog.run("UPDATE products SET name = name || '?'")
    total = catalog.one("SELECT count(*) FROM products")
    hits = 0

    def delivered():
        nonlocal hits
        hits += sighup_other_threads(pid)
        return catalog.one("SELECT count(*) FROM cde.feed_products WHERE status = 'sent' AND doc->>'name' LIKE '%%?'") == total

    wait_until("every product delivered, the sender thread signalled meanwhile", delivered, timeout=60, interval=0.01)
    assert catalog.worker_pid() == pid, "the worker was restarted: it died while sending"
    assert hits > 10


def test_a_fast_shutdown_does_not_wait_for_the_endpoint(catalog, sink):
    # The endpoint takes 30 s to answer (and cde.http_timeout would wait 60 s): a fast shutdown
    # must not wait for it. The worker leaves with the request in flight, its items stay pending,
    # and after the restart they are sent again and recorded.
    catalog.configure(http_timeout="60s")
    sink.fault(feed="products", delay_ms=30000)
    before = sink.stats()["requests"]
    catalog.run("UPDATE products SET name = name || ' (stopped)' WHERE id <= 10")
    wait_until("a request in flight", lambda: sink.stats()["requests"] > before, timeout=30, interval=0.05)
    started = time.monotonic()
    restart_postgres("fast")
    took = time.monotonic() - started
    assert took < 15, f"the fast restart waited {took:.1f}s, as long as the endpoint"
    sink.clear_faults()
    db = Db(reconnect())
    wait_until("the items in flight sent again and recorded", lambda: db.one(
        "SELECT count(*) FROM cde.feed_products WHERE status = 'sent' AND doc->>'name' LIKE '%%(stopped)'") == 10, timeout=60)
    assert "stopping with a request in flight" in (Path(SOCKET).parent / "postgres.log").read_text()


def test_a_terminated_worker_is_started_again(catalog, sink):
    # pg_terminate_backend() of the worker, idle and then with a request in flight: the postmaster
    # starts a new worker (a worker exiting with status 0 would be gone until the server restarts,
    # and delivery with it), and the changes made meanwhile, and the items that were in flight,
    # are delivered by it.
    for round_, in_flight in enumerate((False, True)):
        old = catalog.worker_pid()
        if in_flight:
            sink.fault(feed="products", delay_ms=30000)
            before = sink.stats()["requests"]
            catalog.run("UPDATE products SET name = name || ' (terminated)' WHERE id <= 5")
            wait_until("a request in flight", lambda: sink.stats()["requests"] > before, timeout=30, interval=0.05)
        assert catalog.one("SELECT pg_terminate_backend(%s)", old)
        sink.clear_faults()
        catalog.run("UPDATE products SET name = name || ' (terminated)' WHERE id BETWEEN %s AND 10", 6 if in_flight else 1)
        wait_until(f"round {round_}: a new worker", lambda: catalog.worker_pid() not in (None, old), timeout=30, interval=0.1)
        wait_until(f"round {round_}: the changes delivered by it", lambda: catalog.one(
            "SELECT count(*) FROM cde.feed_products WHERE status = 'sent' AND doc->>'name' LIKE %s",
            "%" + " (terminated)" * (round_ + 1)) == 10, timeout=30)
