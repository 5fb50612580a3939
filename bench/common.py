"""What the benchmarks share: the cluster, the sink, pgbench, and the rows they report."""

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
SOCKET = os.environ["CDE_BENCH_SOCKET"]
PORT = int(os.environ["CDE_BENCH_PORT"])
SINK = os.environ["CDE_BENCH_SINK"]
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
SCALE = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
SECONDS = int(os.environ.get("CDE_BENCH_SECONDS", "20"))

rows = []   # every benchmark's row: (name, figure, goal, met, note)
goals = []  # the goals table: (figure, goal, now, met)


def conn():
    return psycopg.connect(host=SOCKET, port=PORT, user="postgres", dbname="cde", autocommit=True)


def one(db, q, *a):
    r = db.execute(q, a or None).fetchone()
    return r[0] if r else None


def sink(method, path, body=None):
    req = urllib.request.Request(SINK + path, data=body, method=method)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def report(name, figure, goal, ok, note=""):
    rows.append((name, figure, goal, "yes" if ok else "NO", note))
    print(f"  {name}: {figure} (goal {goal}) {'met' if ok else 'NOT met'} {note}", flush=True)


def goal(figure, target, now, ok):
    """A row of the goals table (docs/benchmarks.md): the goals of issue 24, judged in this run."""
    goals.append((figure, target, now, "yes" if ok else "NO"))


def wait(what, fn, timeout):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def pgbench_command(script, seconds, clients=2, rate=None, name=None):
    """The pgbench command running `script` (written to a file of its own, `name` or one per
    calling thread) by `clients` clients (one pgbench thread each) for `seconds`."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"cde-bench-{name or threading.get_ident()}.sql"
    path.write_text(script)
    cmd = [PGBENCH, "-n", "-h", SOCKET, "-p", str(PORT), "-U", "postgres", "-c", str(clients), "-j", str(clients),
           "-T", str(seconds), "-f", str(path), "cde"]
    if rate:
        cmd += ["-R", str(rate)]
    return cmd


def pgbench(script, seconds, clients=2, rate=None):
    """TPS of `script` run by `clients` clients (one pgbench thread each) for `seconds`."""
    out = subprocess.run(pgbench_command(script, seconds, clients, rate), capture_output=True, text=True, check=True).stdout
    return float(re.search(r"tps = ([0-9.]+)", out).group(1))
