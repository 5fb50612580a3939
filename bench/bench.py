"""cde benchmarks on the sample catalog and the project's sink. Run through bench/run SCALE.

Each benchmark prints one row: what was measured, the figure, the goal, and whether it is met.
The cluster is durable (fsync on), as in production."""

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

rows = []


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


def wait(what, fn, timeout):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def pgbench(script, seconds, clients=2, rate=None):
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "cde-bench.sql"
    path.write_text(script)
    cmd = [PGBENCH, "-n", "-h", SOCKET, "-p", str(PORT), "-U", "postgres", "-c", str(clients), "-j", str(clients),
           "-T", str(seconds), "-f", str(path), "cde"]
    if rate:
        cmd += ["-R", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"tps = ([0-9.]+)", out).group(1))


def load(db):
    # Whatever a kept cluster was left with by hand (CDE_BENCH_KEEP) goes: postgresql.conf rules.
    db.execute("ALTER SYSTEM RESET ALL")
    db.execute("SELECT pg_reload_conf()")
    db.execute("SET client_min_messages = warning")
    db.execute("DROP EXTENSION IF EXISTS cde CASCADE")
    db.execute("CREATE EXTENSION cde")
    sink("POST", "/_sink/reset", b"")
    if os.environ.get("CDE_BENCH_KEEP") == "1" and one(db, "SELECT to_regclass('stock') IS NOT NULL") \
            and one(db, "SELECT count(*) FROM products") == SCALE:
        print(f"reusing the catalog of {SCALE} products (CDE_BENCH_KEEP=1)", flush=True)
        # Compacted, as if freshly loaded: each run's bulk updates leave the tables larger (a 1M
        # catalog's products grew 3x over a dozen runs, and COPY of the source query from 11.5
        # to 16.5 s), which would make runs incomparable.
        db.execute("VACUUM (FULL, ANALYZE)")
        return
    print(f"loading the catalog: {SCALE} products", flush=True)
    text = (ROOT / "examples/catalog/schema.sql").read_text().replace(":products", str(SCALE))
    db.execute("\n".join(l for l in text.splitlines() if not l.startswith("\\")))


def register(db):
    text = (ROOT / "examples/catalog/feeds.sql").read_text()
    db.execute(text)


def set_pause(db, on):
    db.execute(f"ALTER SYSTEM SET cde.pause = {'on' if on else 'off'}")
    db.execute("SELECT pg_reload_conf()")
    want = "paused (cde.pause)" if on else "idle"
    wait("the worker to take cde.pause", lambda: (one(db, "SELECT state FROM cde_worker_status") == want) or
         (not on and one(db, "SELECT state FROM cde_worker_status") == "working"), 30)


def bench_single_row(db):
    script = f"\\set id random(1, {SCALE})\nUPDATE prices SET amount = amount + 0.01 WHERE product_id = :id AND currency = 'EUR';\n"
    rounds = int(os.environ.get("CDE_BENCH_ROUNDS", "8"))
    register(db)
    # Capture alone: the worker paused, as the peers' figure (a trigger's cost) is measured.
    # Untracked means the capture triggers disabled. On two shared vCPUs one pair of runs varies
    # by several percent (one run's rounds spread from 0.81 to 1.00), so:
    # - tracked and untracked runs alternate (ABBA), each from the same state: prices vacuumed
    #   (else autovacuum of its dead rows starts in whichever run crosses its threshold) and a
    #   checkpoint taken;
    # - the figure is pooled over the rounds: all tracked transactions / all untracked ones (runs
    #   of equal length), with the median of the rounds' ratios beside it.
    set_pause(db, True)
    ratios, pairs, totals = [], [], {True: 0.0, False: 0.0}
    for i in range(rounds):
        tps = {}
        for tracked in ((True, False) if i % 2 == 0 else (False, True)):
            db.execute(f"ALTER TABLE prices {'ENABLE' if tracked else 'DISABLE'} TRIGGER USER")
            db.execute("VACUUM prices")
            db.execute("CHECKPOINT")
            tps[tracked] = pgbench(script, SECONDS)
            totals[tracked] += tps[tracked]
        db.execute("ALTER TABLE prices ENABLE TRIGGER USER")
        ratios.append(tps[True] / tps[False])
        pairs.append(f"{tps[True]:.0f}/{tps[False]:.0f}")
    set_pause(db, False)
    ratio = totals[True] / totals[False]
    median = statistics.median(ratios)
    report(f"single-row write overhead, capture (pgbench, tracked/untracked TPS pooled over {rounds} ABBA rounds)",
           f"{ratio:.3f} (median of rounds {median:.3f}; rounds: {', '.join(f'{r:.3f}' for r in ratios)}; TPS {', '.join(pairs)})",
           ">= 0.95", ratio >= 0.95)
    # Capture and delivery: the worker collects and sends on the same two cores meanwhile.
    wait("the backlog delivered", lambda: one(db, "SELECT coalesce(sum(pending), 0) FROM cde_feed_status WHERE mode = 'immediate'") == 0, 600)
    db.execute("VACUUM prices")
    db.execute("CHECKPOINT")
    delivering = pgbench(script, SECONDS)
    untracked = totals[False] / rounds
    report("single-row writes while delivering (tracked + worker sending / untracked TPS)",
           f"{delivering / untracked:.3f} ({delivering:.0f} TPS)", "(no goal: the worker shares the 2 cores)", True)


def bench_bulk(db):
    """One UPDATE of every product, tracked and untracked (capture triggers disabled), in ABBA
    order; each run from the same state: the last run's dead rows vacuumed, a checkpoint taken,
    and the worker done with what the last tracked run queued."""
    def timed(tracked):
        db.execute(f"ALTER TABLE products {'ENABLE' if tracked else 'DISABLE'} TRIGGER USER")
        db.execute("VACUUM products")
        db.execute("CHECKPOINT")
        t = time.monotonic()
        db.execute("UPDATE products SET updated_at = now()")
        took = time.monotonic() - t
        db.execute("ALTER TABLE products ENABLE TRIGGER USER")
        if tracked:
            wait("the bulk update delivered", lambda: backlog(db) == 0, 3600)
        return took
    runs = {True: [], False: []}
    for tracked in (False, True, True, False):
        runs[tracked].append(timed(tracked))
    ratio = sum(runs[True]) / sum(runs[False])
    report(f"bulk write overhead (UPDATE of {SCALE} rows, tracked/untracked time, ABBA)",
           f"{ratio:.2f} (tracked {', '.join(f'{t:.2f}s' for t in runs[True])}; untracked {', '.join(f'{t:.2f}s' for t in runs[False])})",
           "<= 1.5", ratio <= 1.5)


def worker_memory_kb(pid):
    """The memory lines of /proc/PID/status (VmRSS, RssAnon, ...), in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0])
    return fields


def bench_full_sync(db):
    query = one(db, "SELECT source_query FROM cde.feeds WHERE name = 'products'")
    # From a quiet database: the bulk benchmark before leaves 1M dead product rows, and their
    # autovacuum (and the hint bits the first reader sets) would run during COPY and the sync.
    db.execute("VACUUM ANALYZE")
    db.execute("CHECKPOINT")
    t = time.monotonic()
    db.execute(f"COPY ({query}) TO '/dev/null'")
    copy_s = time.monotonic() - t
    # Start from an empty feed table so that every document is built, stored, sent and acknowledged.
    db.execute("TRUNCATE cde.feed_products")
    sink("POST", "/_sink/reset", b"")
    pid = one(db, "SELECT pid FROM cde_worker_status")
    samples = []  # (seconds since the start, VmRSS, RssAnon, RssShmem, RssFile in kB)
    stop = threading.Event()
    t0 = time.monotonic()

    def sample():
        while not stop.is_set():
            try:
                now = worker_memory_kb(pid)
                samples.append((time.monotonic() - t0,) + tuple(now.get(f, 0) for f in ("VmRSS", "RssAnon", "RssShmem", "RssFile")))
            except OSError:
                pass
            time.sleep(0.1)
    threading.Thread(target=sample, daemon=True).start()
    took = full_sync_seconds(db)
    stop.set()
    received = sink("GET", "/_sink/stats")["items_received"]
    rate = SCALE / took
    report(f"full sync ({SCALE} products built, hashed, stored, sent, acknowledged)", f"{rate:,.0f} docs/s ({took:.1f}s; sink got {received})",
           ">= 50,000 docs/s", rate >= 50_000)
    report("full sync vs COPY (source query) TO '/dev/null'", f"{took / copy_s:.1f}x ({copy_s:.1f}s for COPY)", "<= 3x", took / copy_s <= 3)
    # VmRSS = RssAnon (the worker's own memory) + RssShmem (the shared memory it touched: the
    # buffer pool the postmaster allocated at start, shared with every backend, up to
    # shared_buffers) + RssFile (mapped code). The worker reads and records every page of a feed
    # table larger than the pool, so its RssShmem reaches shared_buffers whatever it does, and
    # with a pool larger than the feed table it would grow with the catalog while costing no
    # memory: the goal is the memory the worker itself costs, VmRSS - RssShmem. "Flat": its peak
    # in the run's first tenth (a tenth of the catalog sent) against its peak in the whole run.
    shared_buffers = one(db, "SHOW shared_buffers")
    own = [(t, (rss - shmem) / 1024) for t, rss, _, shmem, _ in samples]
    own_peak = max(m for _, m in own)
    own_early = max([m for t, m in own if t <= took / 10] or [0])
    mb = [max(s[i] for s in samples) / 1024 for i in range(1, 5)]
    report("worker memory during the full sync (own = RSS - shared buffers it touched)",
           f"own {own_peak:.0f} MB peak ({own_early:.0f} MB in the first tenth of the run); RSS {mb[0]:.0f} MB = {mb[1]:.0f} MB private"
           f" + {mb[2]:.0f} MB shared memory (shared_buffers = {shared_buffers}) + {mb[3]:.0f} MB mapped code",
           "<= 200 MB, flat in catalog size", own_peak <= 200 and own_peak <= own_early + 16)
    # For information: the same run again, every document unchanged (built, hashed, compared,
    # not sent), with the deletion pass a feed table that is not empty needs.
    sink("POST", "/_sink/reset", b"")
    took = full_sync_seconds(db)
    report("full re-sync, nothing changed", f"{SCALE / took:,.0f} docs/s ({took:.1f}s; sink got {sink('GET', '/_sink/stats')['items_received']})",
           "(no goal)", True)


def full_sync_seconds(db):
    t = time.monotonic()
    run = one(db, "SELECT cde_full_sync('products')")
    wait("the full sync", lambda: one(db, "SELECT status FROM cde_sync_runs WHERE run_id = %s", run) in ("finished", "failed"), 7200)
    return time.monotonic() - t


def bench_latency(db, rate=200):
    sink("POST", "/_sink/reset", b"")
    n = rate * SECONDS
    commits = {}
    ids = list(range(1, min(n, SCALE) + 1))
    # Names new to this run: a kept catalog (CDE_BENCH_KEEP) has the last run's, and an update to
    # the same document is, rightly, not sent again.
    run = time.time_ns()
    t0 = time.monotonic()
    for i, pid in enumerate(ids):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        db.execute("UPDATE products SET name = %s WHERE id = %s", (f"lat {run} {i}", pid))
        commits[str(pid)] = time.time() * 1000
    wait("every update at the sink", lambda: sink("GET", "/_sink/stats")["items_received"] >= len(ids), 120)
    state = sink("GET", "/_sink/state?feed=products")["feeds"]["products"]
    lat = sorted(state[k]["received"] - commits[k] for k in commits if k in state)
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    report(f"latency, commit to sink at {rate} updates/s (p50 / p99)", f"{p50:.0f} ms / {p99:.0f} ms",
           "p50 <= 50 ms, p99 <= 250 ms", p50 <= 50 and p99 <= 250)


def backlog(db, feed="products"):
    """Changes not yet delivered: keys still queued plus rows pending in the feed table."""
    return one(db, f"""SELECT coalesce((SELECT sum(cardinality(keys)) FROM cde.queue WHERE feed = '{feed}'), 0)
                           + (SELECT count(*) FROM cde.feed_{feed} WHERE status = 'pending')""")


def bench_throughput(db, rows_per_statement=50, goal=20_000):
    """Two runs of UPDATEs of 50 neighbouring products per statement, 2 clients.
    1. The goal, the highest rate the worker keeps up with: steady rates (pgbench -R) from 20,000
       changes/s up in steps of 5%, each for 60 s (CDE_BENCH_TP_SECONDS) with the backlog
       sampled every second, until one is not kept up with. A rate is kept up with when the
       writers committed it (98% of it or more: pgbench -R draws its schedule at random, and
       commits 20,000/s give or take half a percent; it falls further short when the writers
       themselves cannot go that fast on the shared vCPUs), the backlog did not trend up (its
       least-squares slope after the first 5 s, over the run, adds less than one second of
       changes: it wobbles by a second or two of changes as collects come and go) and what was
       left at the end was delivered within 5 s.
       The figure is the highest rate kept up with, and what was committed at it.
    2. For information: as fast as the clients go, for SECONDS, and what the worker delivers
       meanwhile, on the same two cores."""
    script = (f"\\set id random(1, {SCALE - rows_per_statement})\n"
              f"UPDATE products SET name = 'tp ' || :id || ' ' || random() WHERE id BETWEEN :id AND :id + {rows_per_statement - 1};\n")
    seconds = int(os.environ.get("CDE_BENCH_TP_SECONDS", "60"))

    def steady(target):
        sink("POST", "/_sink/reset", b"")
        result, samples = [], []
        run = threading.Thread(target=lambda: result.append(pgbench(script, seconds, clients=2, rate=target / rows_per_statement)))
        t0 = time.monotonic()
        run.start()
        while run.is_alive():
            samples.append((time.monotonic() - t0, backlog(db)))
            run.join(1.0)
        t_end = time.monotonic()
        changes = result[0] * rows_per_statement
        wait("the backlog delivered", lambda: backlog(db) == 0, 3600)
        drain = time.monotonic() - t_end
        settled = [(t, b) for t, b in samples if t >= 5]
        trend = statistics.linear_regression([t for t, _ in settled], [b for _, b in settled]).slope if len(settled) > 2 else 0.0
        peak = max([b for _, b in samples] or [0])
        kept_up = changes >= 0.98 * target and trend * seconds < target and drain <= 5
        line = (f"{changes:,.0f} changes/s committed at {target:,}/s; backlog trend {trend:+,.0f} keys/s, peak {peak:,} keys; "
                f"drained {drain:.1f} s after")
        print(f"    {line}: {'kept up' if kept_up else 'not kept up'}", flush=True)
        return kept_up, changes, line

    best, target = None, goal
    while True:
        kept_up, changes, line = steady(target)
        if not kept_up:
            break
        best = (target, line)
        target = int(round(target * 1.05, -2))
    report(f"sustained throughput: the highest steady rate kept up with ({rows_per_statement} products per UPDATE, {seconds} s each)",
           f"{best[0]:,}/s: {best[1]}; not {target:,}/s" if best else f"none from {goal:,}/s: {line}",
           f">= {goal:,} changes/s with bounded lag", best is not None and best[0] >= goal)

    sink("POST", "/_sink/reset", b"")
    t = time.monotonic()
    tps = pgbench(script, SECONDS, clients=2)
    t_end = time.monotonic()
    delivered_during = sink("GET", "/_sink/stats")["items_received"] / (t_end - t)
    wait("the backlog delivered", lambda: backlog(db) == 0, 3600)
    drain = time.monotonic() - t_end
    report(f"flat-out writes ({rows_per_statement} products per UPDATE, 2 clients, {SECONDS} s)",
           f"{tps * rows_per_statement:,.0f} changes/s committed, {delivered_during:,.0f} docs/s delivered meanwhile, backlog drained {drain:.1f} s after",
           "(no goal: writers and worker share 2 cores)", True)


def bench_monitoring(db, changes=100_000, goal_ms=50):
    """What a look at cde costs with a backlog: the worker paused, `changes` single-row UPDATEs
    (each a row of the queue), then every status view read 5 times, and the real postgres_exporter
    (monitoring/queries.yaml, as a pg_monitor member) scraped 5 times; the median of each. Then the
    backlog is delivered."""
    set_pause(db, True)
    db.execute(f"""DO $$ BEGIN FOR i IN 1..{changes} LOOP
                     UPDATE products SET name = 'monitoring ' || i WHERE id = 1 + (i * 7919) % {SCALE};
                   END LOOP; END $$""")
    queued = one(db, "SELECT count(*) FROM cde.queue")
    items = one(db, "SELECT sum(items) FROM cde_feed_status")

    def median_ms(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    views = ["cde_feed_status", "cde_failed_items", "cde_destinations", "cde_worker_status", "cde_sync_runs"]
    figures = {v: median_ms(lambda: db.execute(f"SELECT * FROM {v}").fetchall()) for v in views}
    db.execute("DROP ROLE IF EXISTS cde_bench_exporter")
    db.execute("CREATE ROLE cde_bench_exporter LOGIN IN ROLE pg_monitor")
    listen = "127.0.0.1:19188"
    env = {"DATA_SOURCE_NAME": f"host={SOCKET} port={PORT} user=cde_bench_exporter dbname=cde sslmode=disable"}
    proc = subprocess.Popen(["prometheus-postgres-exporter", f"--web.listen-address={listen}",
                             f"--extend.query-path={ROOT / 'monitoring' / 'queries.yaml'}",
                             "--disable-default-metrics", "--disable-settings-metrics",
                             "--no-collector.bgwriter", "--no-collector.database"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def scrape():
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=30) as r:
            text = r.read().decode()
        assert "pg_exporter_last_scrape_error 0" in text, "the scrape had an error"
        return text
    try:
        def ready():
            try:
                return scrape()
            except OSError:
                return None
        wait("the exporter", ready, 15)
        figures["one exporter scrape (HTTP, every query)"] = median_ms(scrape)
    finally:
        proc.terminate()
        proc.wait(10)
        db.execute("DROP ROLE cde_bench_exporter")
    worst = max(figures.values())
    report(f"status views and one exporter scrape at {items:,} items and {queued:,} queued changes (median of 5, worst)",
           f"{worst:.1f} ms", f"<= {goal_ms} ms each", worst <= goal_ms,
           ", ".join(f"{k} {v:.1f} ms" for k, v in figures.items()))
    set_pause(db, False)
    wait("the backlog delivered", lambda: one(db, "SELECT count(*) FROM cde.queue") == 0, 600)


def main():
    # e.g. "bulk,throughput": load, full sync, then those
    only = set(filter(None, os.environ.get("CDE_BENCH_ONLY", "").split(","))) or None
    with conn() as db:
        load(db)
        print("benchmarks", flush=True)
        if only is None or "single_row" in only:
            bench_single_row(db)
        else:
            register(db)
        if only is None or only - {"single_row"}:
            one(db, "SELECT cde_full_sync()")
            wait("the initial full sync", lambda: one(db, "SELECT count(*) FROM cde_sync_runs WHERE finished_at IS NULL") == 0, 7200)
            for name, bench in [("bulk", bench_bulk), ("full_sync", bench_full_sync), ("latency", bench_latency),
                                ("throughput", bench_throughput), ("monitoring", bench_monitoring)]:
                if only is None or name in only:
                    bench(db)
    print("\n| benchmark | result | goal | met |\n|---|---|---|---|")
    for name, figure, goal, ok, _ in rows:
        print(f"| {name} | {figure} | {goal} | {ok} |")


if __name__ == "__main__":
    main()
