"""CALL cde_deliver(): the worker's job in the caller's session (pg_cron, no worker), committing after
every step. A full sync driven by it holds no transaction across HTTP requests: other sessions see
its deliveries recorded while it runs, and it ends with everything delivered."""

import threading

import psycopg
import pytest

from conftest import connect, fresh_catalog, wait_until


def test_a_full_sync_through_call_cde_deliver_commits_as_it_goes(db, sink):
    fresh_catalog(db, products=6000)
    db.configure(pause="on")   # the worker leaves the work to the procedure
    wait_until("the worker paused", lambda: db.one("SELECT state LIKE 'paused%%' FROM cde_worker_status"))
    run = db.one("SELECT cde_full_sync()")
    sink.reset()
    sink.fault(delay_ms=150)   # every request a little slow: the call takes seconds
    done = threading.Event()
    errors = []

    def call():
        try:
            with connect() as conn:
                conn.execute("CALL cde_deliver()")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=call, daemon=True).start()
    # While the call runs, its deliveries are already recorded, and visible here.
    wait_until("deliveries recorded while the call runs",
               lambda: db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'sent'") > 0 or done.is_set(), timeout=60)
    assert not done.is_set(), "the call ended before any of its deliveries could be seen: nothing was committed on the way"
    sent_midway = db.one("SELECT count(*) FROM cde.feed_products WHERE status = 'sent'")
    assert 0 < sent_midway < 6000
    assert db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "executing"
    wait_until("the call", done.is_set, timeout=120)
    assert not errors, errors
    sink.clear_faults()
    assert db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished"
    assert db.one("SELECT count(*) FROM cde.feed_products WHERE status <> 'sent'") == 0
    assert len(sink.docs("products")) == 6000
    db.configure(pause=None)


def test_cde_deliver_refuses_a_transaction_block(db):
    fresh_catalog(db, products=10)
    with connect() as conn:
        conn.autocommit = False
        with pytest.raises(psycopg.errors.InvalidTransactionTermination, match="CALL it on its own"):
            conn.execute("CALL cde_deliver()")
