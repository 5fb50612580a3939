"""A real streaming replica (pg_basebackup -R) of the test cluster: on the standby no worker writes
and cde_worker_status says so, the views answer; after a failover (the primary killed with
-m immediate, the standby promoted) the promoted server delivers what the dead primary had queued
and finishes the full sync that was running there; cde_sync_runs tells the truth."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
import yaml

from conftest import PG_BIN, PORT, ROOT, SOCKET, Db, fresh_catalog, reconnect, wait_until

BIN = PG_BIN
REPLICA_PORT = PORT + 1


def as_postgres(*cmd):
    cmd = [str(c) for c in cmd]
    if os.geteuid() == 0:
        cmd = ["sudo", "-u", "postgres"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture
def replica(db):
    d = Path(tempfile.mkdtemp(prefix="cde-replica-"))
    os.chmod(d, 0o755)
    shutil.chown(d, "postgres", "postgres")
    data, sock = d / "data", d / "run"
    as_postgres("mkdir", "-p", sock)
    as_postgres(BIN / "pg_basebackup", "-h", SOCKET, "-p", PORT, "-U", "postgres", "-D", data, "-R", "-X", "stream", "--checkpoint=fast")
    as_postgres("sh", "-c", f"printf \"port = {REPLICA_PORT}\\nunix_socket_directories = '{sock}'\\n\" >> {data}/postgresql.auto.conf")
    as_postgres(BIN / "pg_ctl", "-D", data, "-l", d / "postgres.log", "-w", "-t", "60", "start")
    yield {"data": data, "sock": str(sock), "log": d / "postgres.log"}
    try:
        as_postgres(BIN / "pg_ctl", "-D", data, "-m", "immediate", "stop")
    except subprocess.CalledProcessError:
        pass   # stopped by the test already
    # Kept beside the primary's log, for a failure's post-mortem.
    shutil.copy(d / "postgres.log", Path(SOCKET).parent / "replica.log")
    shutil.rmtree(d, ignore_errors=True)


def connect_replica(r):
    return psycopg.connect(host=r["sock"], port=REPLICA_PORT, user="postgres", dbname="cde", autocommit=True)


def test_a_standby_writes_nothing_and_a_promoted_one_delivers(db, sink, replica):
    fresh_catalog(db, products=3000)
    # What the primary will have queued and not delivered when it dies: its worker paused (the
    # standby does not replicate the setting: ALTER SYSTEM is not WAL).
    db.configure(pause="on")
    wait_until("the worker paused", lambda: db.one("SELECT state LIKE 'paused%%' FROM cde_worker_status"))
    sink.reset()
    db.run("UPDATE products SET name = 'changed before the failover' WHERE id <= 30")
    db.run("UPDATE categories SET name = 'renamed before the failover' WHERE id = 1")
    run = db.one("SELECT cde_full_sync('attributes')")
    # The insert position, not pg_current_wal_lsn() (the write position): with the test cluster's
    # synchronous_commit = off, the commits above may not be written yet.
    lsn = db.one("SELECT pg_current_wal_insert_lsn()::text")

    with connect_replica(replica) as conn:
        standby = Db(conn)
        wait_until("the standby to replay it", lambda: standby.one("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn), timeout=30)
        state = standby.one("SELECT state FROM cde_worker_status")
        assert state.startswith("standby"), state
        assert standby.one("SELECT running FROM cde_worker_status") is False
        assert standby.one("SELECT count(*) FROM cde_feed_status") == 6
        assert standby.one("SELECT pending FROM cde_feed_status WHERE feed = 'products'") > 0
        assert standby.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "preparing"
        # The exporter's queries (monitoring/queries.yaml) answer, with no row: the standby exports
        # nothing of cde, so no alert fires for it (the worker that is not running there first).
        queries = yaml.safe_load((ROOT / "monitoring" / "queries.yaml").read_text())
        for key, q in queries.items():
            assert standby.rows(q["query"]) == [], key
        assert all(db.rows(queries[k]["query"]) for k in ("cde_feed", "cde_worker", "cde_sync", "cde_destination")), \
            "the same queries answer on the primary"
    assert sink.docs("products") == {}, "nothing may be delivered by either server yet"

    # Failover: the primary dies, the standby is promoted; its worker starts and delivers.
    as_postgres(BIN / "pg_ctl", "-D", Path(SOCKET).parent / "data", "-m", "immediate", "stop")
    try:
        as_postgres(BIN / "pg_ctl", "-D", replica["data"], "-w", "promote")
        with connect_replica(replica) as conn:
            promoted = Db(conn)
            wait_until("the promoted server's worker", lambda: promoted.one("SELECT running FROM cde_worker_status"), timeout=30)
            wait_until("the changes queued on the dead primary", lambda: sum(
                1 for d in sink.docs("products").values() if d["data"]["name"] == "changed before the failover") == 30, timeout=60)
            wait_until("the category", lambda: (sink.doc("categories", 1) or {}).get("data", {}).get("name") == "renamed before the failover")
            wait_until("the full sync begun on the dead primary", lambda: promoted.one(
                "SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished", timeout=60)
            assert promoted.one("SELECT count(*) FROM cde_sync_runs WHERE finished_at IS NULL") == 0
            assert promoted.one("SELECT coalesce(sum(pending), 0) FROM cde_feed_status") == 0
    finally:
        # The old primary comes back on its own timeline for the tests after this one.
        as_postgres(BIN / "pg_ctl", "-D", replica["data"], "-m", "fast", "stop")
        as_postgres(BIN / "pg_ctl", "-D", Path(SOCKET).parent / "data", "-l", Path(SOCKET).parent / "postgres.log",
                    "-w", "-t", "120", "start")
        with reconnect() as conn:
            Db(conn).configure(pause=None)
