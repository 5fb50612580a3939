"""End-to-end fixtures: a real preloaded PostgreSQL cluster (scripts/cluster) and the real sink
(crates/cde-sink), both started by scripts/test. Nothing here is mocked."""

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import psycopg
from psycopg import sql
import pytest

ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("CDE_TEST_PORT", "54330"))
SOCKET = os.environ.get("CDE_TEST_SOCKET", str(ROOT / ".cde" / "test" / "run"))
SINK = os.environ.get("CDE_TEST_SINK", "http://127.0.0.1:18787")
CATALOG = ROOT / "examples" / "catalog"
SERVER_LOG = Path(SOCKET).parent / "postgres.log"
# The server's binaries (scripts/lib.sh: Debian's 15, or a tree of scripts/fetch-pg).
PG_BIN = Path(os.environ.get("CDE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def wait_until(what, fn, timeout=10.0, interval=0.05):
    """Poll fn until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Sink:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def reset(self):
        self.call("POST", "/_sink/reset", b"")
        self.call("POST", "/_sink/api-key", b"")

    def fault(self, **rule):
        self.call("POST", "/_sink/faults", rule)

    def clear_faults(self):
        self.call("DELETE", "/_sink/faults")

    def docs(self, feed):
        return self.call("GET", f"/_sink/state?feed={feed}")["feeds"].get(feed, {})

    def doc(self, feed, key):
        return self.docs(feed).get(str(key))

    def log(self, feed=None):
        reqs = self.call("GET", "/_sink/log")["requests"]
        return [r for r in reqs if feed is None or r.get("feed") == feed]

    def stats(self):
        return self.call("GET", "/_sink/stats")

    def healthy(self):
        try:
            self.call("GET", "/_sink/health")
            return True
        except OSError:
            return False


def start_sink(port):
    """Another real sink, on `port`: (its process, a Sink), once it answers."""
    p = subprocess.Popen([str(ROOT / "target" / "release" / "cde-sink"), "--listen", f"127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = Sink(f"http://127.0.0.1:{port}")
    wait_until(f"the sink on port {port}", s.healthy)
    return p, s


class Db:
    def __init__(self, conn):
        self.conn = conn

    def rows(self, q, *args):
        with self.conn.cursor() as cur:
            cur.execute(q, args or None)
            return cur.fetchall() if cur.description else []

    def one(self, q, *args):
        rows = self.rows(q, *args)
        return rows[0][0] if rows else None

    def run(self, q, *args):
        self.rows(q, *args)

    def script(self, path, **psql_vars):
        text = Path(path).read_text()
        for k, v in psql_vars.items():
            text = text.replace(f":{k}", str(v))
        text = "\n".join(l for l in text.splitlines() if not l.startswith("\\"))
        with self.conn.cursor() as cur:
            cur.execute(text)

    def configure(self, **settings):
        """ALTER SYSTEM SET cde.<name> for each setting (None resets it), reload, and wait for the
        worker to have taken the new settings."""
        before, t0 = self.rows("SELECT reloads, now() FROM cde_worker_status")[0]
        for k, v in settings.items():
            if v is None:
                self.run(f"ALTER SYSTEM RESET cde.{k}")
            else:
                self.run(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL("cde." + k), sql.Literal(str(v))))
        self.run("SELECT pg_reload_conf()")
        # Either the running worker reloads, or a worker started since has read them anyway.
        wait_until("the worker to reload its settings",
                   lambda: self.one("SELECT running AND (reloads > %s OR started_at >= %s) FROM cde_worker_status", before, t0))

    def worker_pid(self):
        return self.one("SELECT pid FROM cde_worker_status WHERE running")


def connect(dbname="cde"):
    return psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname=dbname, autocommit=True)


def reconnect():
    """A new connection once the server accepts them again (after a restart or a crash)."""
    def attempt():
        try:
            return connect()
        except psycopg.Error:
            return None
    return wait_until("a connection", attempt, timeout=60, interval=0.2)


def restart_postgres(mode):
    """pg_ctl restart -m MODE (fast: a clean shutdown; immediate: crash recovery at start)."""
    data = Path(SOCKET).parent / "data"
    cmd = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "120",
           "-l", str(Path(SOCKET).parent / "postgres.log"), "restart"]
    if os.geteuid() == 0:
        cmd = ["sudo", "-u", "postgres"] + cmd
    subprocess.run(cmd, check=True, capture_output=True)


def kill_worker(db):
    """kill -9 the worker. The postmaster then resets every backend (this connection too) and
    restarts: wait for a new worker and return a new connection."""
    old = db.worker_pid()
    os.kill(old, 9)

    def new_worker():
        try:
            with connect() as conn:
                pid = Db(conn).worker_pid()
                return pid is not None and pid != old
        except psycopg.Error:
            return False

    wait_until("a new worker after kill -9", new_worker, timeout=60, interval=0.2)
    return connect()


@pytest.fixture
def sink():
    s = Sink(SINK)
    s.reset()
    yield s
    s.clear_faults()


@pytest.fixture
def db():
    with connect() as conn:
        yield Db(conn)
    # Leave the cluster's configuration as the tests found it.
    try:
        with connect() as conn:
            conn.execute("ALTER SYSTEM RESET ALL")
            conn.execute("SELECT pg_reload_conf()")
    except psycopg.Error:
        pass


def fresh_catalog(db, products=200):
    """The sample catalog with its feeds, fresh, and the worker's settings back to the test baseline."""
    db.run("ALTER SYSTEM RESET ALL")
    db.run("SET client_min_messages = warning")
    db.run("DROP EXTENSION IF EXISTS cde CASCADE")
    # The previous test's worker may deliver until the drop (a retry falling due, say). DROP
    # EXTENSION waits for requests in flight, so from here the sink holds only this test's.
    Sink(SINK).reset()
    db.run("CREATE EXTENSION cde")
    db.script(CATALOG / "schema.sql", products=products)
    db.script(CATALOG / "feeds.sql")
    # Fast retries and a short legacy pass keep the tests short; each test may change them.
    db.configure(retry_interval="1s", legacy_interval="2s", http_timeout="2s", poll_interval="1s")


def full_sync_and_wait(db, feed=None, timeout=60):
    run = db.one("SELECT cde_full_sync(%s)", feed)
    wait_until(f"full sync run {run} to finish",
               lambda: db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) in ("finished", "failed", "cancelled"),
               timeout=timeout)
    assert db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished"
    return run


@pytest.fixture
def catalog(db, sink):
    fresh_catalog(db)
    full_sync_and_wait(db)
    sink.reset()
    return db
