"""The extension's life around a busy worker: DROP EXTENSION and CREATE EXTENSION again while the
worker is in the middle of an iteration must succeed, every time."""

from conftest import fresh_catalog, wait_until


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
