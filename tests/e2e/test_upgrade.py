"""The 0.2.0 library in a database still at 0.1.0 touches nothing and says it waits for the update;
ALTER EXTENSION cde UPDATE, with the worker connected, and it goes on (scripts/upgrade-test
compares the updated objects with a fresh install and checks what was in flight)."""

import shutil
import subprocess
from pathlib import Path

from conftest import PG_BIN, ROOT, SERVER_LOG, wait_until


def test_the_worker_waits_for_the_update_then_delivers(db, sink):
    sharedir = subprocess.run([str(PG_BIN / "pg_config"), "--sharedir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    shutil.copy(ROOT / "sql" / "cde--0.1.0.sql", Path(sharedir) / "extension")
    db.run("SET client_min_messages = warning")
    db.run("DROP EXTENSION IF EXISTS cde CASCADE")
    db.run("DROP TABLE IF EXISTS up_things")
    db.run("CREATE EXTENSION cde VERSION '0.1.0'")
    # 0.1.0's install script does not ask the launcher to serve the database (0.2.0's does): a
    # worker that saw the DROP has left, and a reload has the launcher look again (as a restart
    # onto the 0.2.0 library does).
    db.run("SELECT pg_reload_conf()")
    wait_until("the worker waiting for the update",
               lambda: (db.one("SELECT state FROM cde_worker_status") or "").startswith("waiting for ALTER EXTENSION cde UPDATE"),
               timeout=15)
    db.run("CREATE TABLE up_things (id int PRIMARY KEY, name text)")
    db.run("SELECT cde_register_feed('up_things', 'SELECT id, name FROM up_things')")
    db.run("SELECT cde_track('up_things', 'up_things')")
    db.run("INSERT INTO up_things VALUES (1, 'queued at 0.1.0')")
    assert db.one("SELECT count(*) FROM cde.queue") == 1, "the worker must leave a 0.1.0 database as it is"
    assert "the worker waits for ALTER EXTENSION cde UPDATE" in SERVER_LOG.read_text()

    db.run("ALTER EXTENSION cde UPDATE TO '0.2.0'")
    wait_until("the queued change, delivered after the update",
               lambda: (sink.doc("up_things", 1) or {}).get("data", {}).get("name") == "queued at 0.1.0", timeout=15)
    assert db.one("SELECT extversion FROM pg_extension WHERE extname = 'cde'") == "0.2.0"
    db.run("DROP EXTENSION cde CASCADE")
    db.run("DROP TABLE up_things")
