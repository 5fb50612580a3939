"""The capture methods a DBA would otherwise pick, measured on cde's workload in the same run.

- untracked: no capture at all (every user trigger of the table disabled); the ratios' base.
- cde: cde_track's statement triggers (the worker paused: what the writers pay).
- pgq: PgQ's C row trigger `pgq.jsontriga` into a PgQ queue (Debian postgresql-15-pgq3).
- plpgsql: a PL/pgSQL AFTER ROW trigger inserting the row's JSON into an event table, as
  Hasura's event triggers do (its `event_log` table, uuid key and fetch index).
- wal2json: no trigger; logical decoding of the WAL by a `wal2json` slot, streamed by
  `pg_recvlogical` during the run, the approach of Debezium and Sequin. Its writers pay only
  wal_level = logical (set for every method here), and its decoding shares the cores.

With CDE_BENCH_CEILINGS=1, two variants of cde's own capture join the single-row runs. They show
what a redesign of its queue could win at most, measured before it is built (docs/benchmarks.md,
"Eighteenth session"):
- cde_noindex: the same triggers, cde.queue without its (feed, id) index: the writers' side of an
  unindexed queue, as PgQ's rotated tables would be (it still takes the queue's sequence, which
  such a design would not need).
- cde_unlogged: the same triggers, cde.queue UNLOGGED: no WAL for the queue's rows.
Each puts the queue back as it was after its run. In a full run the same setting adds the
throughput ceilings (bench.py, bench_throughput_ceilings).

Each method's run starts from the same state: its event tables emptied, the written table
vacuumed, a checkpoint taken. Runs of the methods alternate in a rotating order, and a method's
figure is pooled over the rounds (its transactions over the untracked runs' transactions)."""

import os
import subprocess
import time

from common import PORT, SOCKET, one, wait

CEILINGS = ("cde_noindex", "cde_unlogged") if os.environ.get("CDE_BENCH_CEILINGS") == "1" else ()
METHODS = ("untracked", "cde", "pgq", "plpgsql", "wal2json") + CEILINGS
TRIGGER_PEERS = ("pgq", "plpgsql")
RECVLOGICAL = "/usr/lib/postgresql/15/bin/pg_recvlogical"
SLOT = "cde_bench_wal2json"

# Hasura's event_log (hdb_catalog, v2) and the body of its generated notify_hasura_* function,
# reduced to what a write pays: build the payload, insert it.
PLPGSQL = """
CREATE TABLE cde_bench_event_log (
    id            text DEFAULT gen_random_uuid() PRIMARY KEY,
    schema_name   text NOT NULL,
    table_name    text NOT NULL,
    trigger_name  text NOT NULL,
    payload       jsonb NOT NULL,
    delivered     boolean NOT NULL DEFAULT false,
    error         boolean NOT NULL DEFAULT false,
    tries         integer NOT NULL DEFAULT 0,
    created_at    timestamp DEFAULT now(),
    locked        timestamptz,
    next_retry_at timestamp,
    archived      boolean NOT NULL DEFAULT false
);
CREATE INDEX ON cde_bench_event_log (trigger_name);
CREATE INDEX ON cde_bench_event_log (locked NULLS FIRST, next_retry_at NULLS FIRST, created_at)
    WHERE delivered = false AND error = false AND archived = false;
CREATE FUNCTION cde_bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    _old json;
    _new json;
BEGIN
    IF TG_OP <> 'INSERT' THEN _old := row_to_json(OLD); END IF;
    IF TG_OP <> 'DELETE' THEN _new := row_to_json(NEW); END IF;
    INSERT INTO cde_bench_event_log (schema_name, table_name, trigger_name, payload)
    VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_NAME,
            json_build_object('op', TG_OP, 'data', json_build_object('old', _old, 'new', _new)));
    RETURN NULL;
END $$;
"""


def install(db, tables):
    """The peers' objects, and their triggers on `tables`, disabled until a run enables them."""
    remove(db)
    db.execute("CREATE EXTENSION pgq")
    db.execute("SELECT pgq.create_queue('cde_bench')")
    db.execute(PLPGSQL)
    for t in tables:
        db.execute(f"CREATE TRIGGER cde_bench_pgq AFTER INSERT OR UPDATE OR DELETE ON {t} "
                   "FOR EACH ROW EXECUTE FUNCTION pgq.jsontriga('cde_bench')")
        db.execute(f"CREATE TRIGGER cde_bench_plpgsql AFTER INSERT OR UPDATE OR DELETE ON {t} "
                   "FOR EACH ROW EXECUTE FUNCTION cde_bench_notify()")
        use(db, t, "cde")


def remove(db):
    db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
    db.execute("DROP EXTENSION IF EXISTS pgq CASCADE")  # its triggers with it
    db.execute("DROP FUNCTION IF EXISTS cde_bench_notify() CASCADE")
    db.execute("DROP TABLE IF EXISTS cde_bench_event_log")


def use(db, table, method):
    """Enable `method`'s triggers on `table` and disable every other user trigger."""
    db.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    triggers = "cde" if method in CEILINGS else method  # the ceilings are cde's own triggers
    pattern = {"cde": r"cde\_capture\_%", "pgq": "cde_bench_pgq", "plpgsql": "cde_bench_plpgsql"}.get(triggers)
    if pattern:
        for (name,) in db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE %s AND NOT tgisinternal",
                                  (table, pattern)).fetchall():
            db.execute(f'ALTER TABLE {table} ENABLE TRIGGER "{name}"')


def empty(db):
    """Every method's event table emptied: each run starts as the first did."""
    db.execute("TRUNCATE cde.queue")
    db.execute("TRUNCATE cde_bench_event_log")
    db.execute("TRUNCATE pgq.event_template")  # the parent of every PgQ queue's event tables


class Receiver:
    """A wal2json slot streamed by pg_recvlogical: made at the start, consumed to the end of the
    WAL written meanwhile, then dropped, so that no other run decodes or keeps its WAL."""

    def __init__(self, db, tables=None, stdout=subprocess.DEVNULL):
        self.db = db
        db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,))
        db.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (SLOT,))
        options = ["-o", "format-version=2"]
        if tables:
            options += ["-o", "add-tables=" + ",".join(f"public.{t}" for t in tables)]
        self.proc = subprocess.Popen([RECVLOGICAL, "-h", SOCKET, "-p", str(PORT), "-U", "postgres", "-d", "cde", "-S", SLOT,
                                      "--start", "-s", "1", "-f", "-", *options], stdout=stdout, stderr=subprocess.DEVNULL)
        wait("pg_recvlogical streaming", lambda: one(db, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", SLOT), 30)

    def close(self, timeout=600):
        end = one(self.db, "SELECT pg_current_wal_lsn()")
        try:
            wait("wal2json to decode the run", lambda: self.proc.poll() is not None or one(
                self.db, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", end, SLOT), timeout)
        finally:
            self.proc.terminate()
            self.proc.wait(30)
            wait("the slot released", lambda: not one(self.db, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", SLOT), 30)
            self.db.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))


def run(db, table, method, fn):
    """fn() with `method` capturing writes to `table`, from the same state as every other run."""
    use(db, table, method)
    empty(db)
    if method == "cde_noindex":
        db.execute("DROP INDEX cde.queue_feed_id")
    elif method == "cde_unlogged":
        db.execute("ALTER TABLE cde.queue SET UNLOGGED")
    db.execute(f"VACUUM {table}")
    db.execute("CHECKPOINT")
    receiver = Receiver(db) if method == "wal2json" else None
    try:
        return fn()
    finally:
        if receiver:
            receiver.close()
        if method == "cde_noindex":
            db.execute("CREATE INDEX queue_feed_id ON cde.queue (feed, id)")
        elif method == "cde_unlogged":
            empty(db)  # SET LOGGED copies the table into the WAL
            db.execute("ALTER TABLE cde.queue SET LOGGED")


def orders(rounds):
    """The methods' order in each round: rotated by one each round, reversed every other one."""
    for i in range(rounds):
        order = METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)]
        yield order if i % 2 == 0 else tuple(reversed(order))


def rounds():
    return int(os.environ.get("CDE_BENCH_ROUNDS", "3"))


def seconds():
    return int(os.environ.get("CDE_BENCH_PEER_SECONDS", "10"))


def elapsed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t
