"""Destinations: each feed to its own service, with its own credentials, signed (verified here with
the Standard Webhooks library, a verifier written elsewhere), within its rate limit, and never held
up by another destination that hangs, is down or is gone. Three real sinks: the suite's own
(the default destination, cde.endpoint) and two started here."""

import base64
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from psycopg import errors
from standardwebhooks.webhooks import Webhook

from conftest import SERVER_LOG, connect, fresh_catalog, full_sync_and_wait, start_sink, wait_until

PORTS = {"search": 18801, "erp": 18802}
SECRET = "whsec_" + base64.b64encode(b"cde-e2e-signing-secret-0001").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"cde-e2e-signing-secret-0002").decode()


@pytest.fixture(scope="module")
def sinks():
    procs, out = [], {}
    for name, port in PORTS.items():
        p, out[name] = start_sink(port)
        procs.append(p)
    yield out
    for p in procs:
        p.terminate()
        p.wait()


@pytest.fixture
def secrets():
    """A folder of secret files only the server's OS user reads."""
    d = Path(tempfile.mkdtemp(prefix="cde-e2e-secrets-"))
    os.chmod(d, 0o755)
    files = {}

    def write(name, text):
        p = d / name
        p.write_text(text + "\n")
        os.chmod(p, 0o600)
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(p, pw.pw_uid, pw.pw_gid)
        files[name] = p
        return str(p)

    yield write
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shop(db, sink, sinks, secrets):
    """The sample catalog: products to the default destination (the suite's sink), categories to
    `search` (signed), prices to `erp` (its own bearer key)."""
    for s in sinks.values():
        s.reset()
        s.call("POST", "/_sink/signing-secret", b"")
        s.call("POST", "/_sink/capture", b"off")
    fresh_catalog(db)
    sinks["search"].call("POST", "/_sink/signing-secret", SECRET.encode())
    sinks["search"].call("POST", "/_sink/capture", b"on")
    sinks["erp"].call("POST", "/_sink/api-key", b"erp-key")
    db.run("SELECT cde_set_destination('search', %s, jsonb_build_object('signing_secret_file', %s::text))",
           f"http://127.0.0.1:{PORTS['search']}/ingest", secrets("search.whsec", SECRET))
    db.run("SELECT cde_set_destination('erp', %s, jsonb_build_object('api_key_file', %s::text, 'timeout', '2s'))",
           f"http://127.0.0.1:{PORTS['erp']}/ingest", secrets("erp.key", "erp-key"))
    move(db, "categories", "search")
    move(db, "prices", "erp")
    full_sync_and_wait(db)
    return db


def move(db, feed, destination):
    """Register the feed again as it is, sending to `destination`."""
    db.run("""SELECT cde_register_feed(name, source_query, NULL, mode, depends_on, batch_size,
                                       destination => %s, key_columns => key_columns) FROM cde.feeds WHERE name = %s""", destination, feed)


def state(db, name):
    return db.one("SELECT state FROM cde_destinations WHERE name = %s", name)


def test_each_feed_arrives_at_its_own_destination_signed_and_verified(shop, sink, sinks):
    db = shop
    search, erp = sinks["search"], sinks["erp"]
    assert set(r["feed"] for r in search.log()) == {"categories"}
    assert set(r["feed"] for r in erp.log()) == {"prices"}
    assert "categories" not in {r["feed"] for r in sink.log()} and "prices" not in {r["feed"] for r in sink.log()}
    assert len(search.docs("categories")) == db.one("SELECT count(*) FROM categories")
    assert len(erp.docs("prices")) == db.one("SELECT count(DISTINCT product_id) FROM prices")
    assert all(r["authorization"] for r in erp.log()) and not any(r["authorization"] for r in search.log())
    # The full sync's phases kept their order across destinations: every category (at `search`)
    # before the first product (at the default sink).
    assert max(r["t"] for r in search.log("categories")) <= min(r["t"] for r in sink.log("products"))

    # Every request to `search` verifies with the reference library, over the body as received.
    wh = Webhook(SECRET)
    reqs = search.log()
    assert reqs and all(r["status"] == 200 for r in reqs)
    for r in reqs:
        headers = r["webhook"]
        assert headers["webhook-id"] == r["idempotency_key"]
        wh.verify(r["body"], headers)
    # A wrong secret does not verify.
    with pytest.raises(Exception):
        Webhook(NEW_SECRET).verify(reqs[0]["body"], reqs[0]["webhook"])

    # The response's x-request-id is kept on each item the worker sent, for support tickets
    # (what the full sync's builders delivered themselves has none: docs/protocol.md).
    db.run("UPDATE categories SET name = name || ' changed'")
    wait_until("the changed categories sent", lambda: db.one(
        "SELECT count(*) FROM cde.feed_categories WHERE status = 'sent' AND right(doc->>'name', 8) = ' changed'") ==
        db.one("SELECT count(*) FROM categories"))
    ids = {r["request_id"] for r in search.log()}
    assert db.one("SELECT count(*) FROM cde.feed_categories WHERE response_id IS NULL") == 0
    assert {x for (x,) in db.rows("SELECT DISTINCT response_id FROM cde.feed_categories")} <= ids

    rows = {r[0]: r[1:] for r in db.rows(
        "SELECT name, state, requests >= 1, items_sent >= 1, feeds, signed, bearer_key FROM cde_destinations")}
    assert rows["search"] == ("ok", True, True, ["categories"], True, False)
    assert rows["erp"] == ("ok", True, True, ["prices"], False, True)
    assert rows["default"][0] == "ok" and "products" in rows["default"][3]


def test_the_sink_refuses_a_wrong_signature_and_a_rotation_keeps_delivering(shop, sinks, secrets):
    db = shop
    search = sinks["search"]
    # The receiver rotated to a new secret that cde does not have yet: refused (401), held.
    search.call("POST", "/_sink/signing-secret", NEW_SECRET.encode())
    db.run("UPDATE categories SET name = name || ' r1' WHERE id = 1")
    wait_until("the refusal", lambda: any(r["status"] == 401 for r in search.log("categories")))
    wait_until("destination search holding", lambda: state(db, "search") == "holding")
    assert db.one("SELECT held_error FROM cde_destinations WHERE name = 'search'").startswith("unauthorized (HTTP 401)")
    assert not search.doc("categories", 1)["data"]["name"].endswith(" r1")
    # cde signs with both while the secret rotates: the receiver accepts either.
    db.run("SELECT cde_set_destination('search', endpoint, options || jsonb_build_object('signing_secret_file', %s::text)) "
           "FROM cde.destinations WHERE name = 'search'", secrets("rotating.whsec", f"{SECRET}\n{NEW_SECRET}"))
    wait_until("the change delivered", lambda: search.doc("categories", 1)["data"]["name"].endswith(" r1"))
    last = search.log("categories")[-1]
    assert len(last["webhook"]["webhook-signature"].split(" ")) == 2
    Webhook(NEW_SECRET).verify(last["body"], last["webhook"])
    Webhook(SECRET).verify(last["body"], last["webhook"])
    wait_until("destination search ok", lambda: state(db, "search") == "ok")


def test_a_rate_limit_is_kept_at_the_sink_and_costs_no_more_than_it_implies(db, sink, sinks):
    limited = sinks["search"]
    limited.reset()
    limited.call("POST", "/_sink/signing-secret", b"")
    fresh_catalog(db, products=3000)
    db.run("SELECT cde_set_destination('limited', %s, '{\"max_requests_per_second\": 2, \"batch_size\": 150}')",
           f"http://127.0.0.1:{PORTS['search']}/ingest")
    move(db, "products", "limited")
    started = time.monotonic()
    run = db.one("SELECT cde_full_sync('products')")
    # Meanwhile another destination's feed arrives within a second of its commit.
    lags = []
    while db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) not in ("finished", "failed", "cancelled"):
        if len(lags) < 3 and time.monotonic() - started > 2 + 2 * len(lags):
            db.run("UPDATE categories SET name = %s WHERE id = 2", f"tick {len(lags)}")
            t0 = time.monotonic()
            wait_until("the category at the default sink",
                       lambda: (sink.doc("categories", 2) or {}).get("data", {}).get("name") == f"tick {len(lags)}",
                       timeout=5, interval=0.02)
            lags.append(time.monotonic() - t0)
        assert time.monotonic() - started < 120, "the full sync took too long"
        time.sleep(0.1)
    took = time.monotonic() - started
    assert db.one("SELECT status FROM cde_sync_runs WHERE run_id = %s", run) == "finished"
    times = sorted(r["t"] for r in limited.log("products"))
    n = len(times)
    assert n >= 20, f"{n} requests: the batches were not cut as the destination says"
    worst = max(sum(1 for u in times[i:] if u < t + 1000) for i, t in enumerate(times))
    assert worst <= 2, f"{worst} requests in one second at the sink"
    implied = (n - 1) / 2
    assert took < implied * 1.3 + 5, f"{n} requests took {took:.1f}s; the limit implies {implied:.1f}s"
    assert len(lags) == 3 and max(lags) < 1.0, f"the other destination's changes took {lags}"
    assert len(limited.docs("products")) == 3000


def test_a_destination_that_hangs_or_is_down_delays_no_other(shop, sink, sinks):
    db = shop
    erp = sinks["erp"]
    # erp answers after 20 s (its timeout is 2 s): every request to it times out.
    erp.fault(feed="prices", delay_ms=20000)
    db.run("UPDATE prices SET amount = amount + 1 WHERE product_id <= 5")
    wait_until("a request to erp in flight", lambda: len(erp.log("prices")) > 0)
    for i in range(3):
        db.run("UPDATE products SET name = %s WHERE id = 7", f"while erp hangs {i}")
        t0 = time.monotonic()
        wait_until("the product at the default sink",
                   lambda: (sink.doc("products", 7) or {}).get("data", {}).get("name") == f"while erp hangs {i}",
                   timeout=5, interval=0.02)
        assert time.monotonic() - t0 < 1.0, "a change waited for another destination's timeout"
    wait_until("erp failing", lambda: state(db, "erp") == "failing", timeout=15)
    assert db.one("SELECT last_error FROM cde_destinations WHERE name = 'erp'") == "timeout"
    erp.clear_faults()

    # Down: nothing listens at its endpoint.
    db.run("SELECT cde_set_destination('erp', 'http://127.0.0.1:9/ingest', options) FROM cde.destinations WHERE name = 'erp'")
    db.run("UPDATE prices SET amount = amount + 1 WHERE product_id <= 5")
    for i in range(3):
        db.run("UPDATE products SET name = %s WHERE id = 8", f"while erp is down {i}")
        t0 = time.monotonic()
        wait_until("the product at the default sink",
                   lambda: (sink.doc("products", 8) or {}).get("data", {}).get("name") == f"while erp is down {i}",
                   timeout=5, interval=0.02)
        assert time.monotonic() - t0 < 1.0
    wait_until("erp failing", lambda: db.one("SELECT last_error FROM cde_destinations WHERE name = 'erp'") == "connection refused")
    # Back: what waited arrives, in order, nothing lost.
    db.run("SELECT cde_set_destination('erp', %s, options) FROM cde.destinations WHERE name = 'erp'",
           f"http://127.0.0.1:{PORTS['erp']}/ingest")
    wait_until("every price delivered", lambda: db.one(
        "SELECT count(*) FROM cde.feed_prices WHERE status <> 'sent'") == 0, timeout=30)
    want = {k: d for k, d in db.rows("SELECT key, doc FROM cde.feed_prices WHERE key::int <= 5")}
    assert len(want) == 5
    assert {k: erp.doc("prices", k)["data"] for k in want} == want
    wait_until("erp ok", lambda: state(db, "erp") == "ok")


def test_410_disables_a_destination_until_it_is_set_again(shop, sinks):
    db = shop
    search = sinks["search"]
    search.fault(feed="categories", status=410, body="this feed is gone", count=1)
    db.run("UPDATE categories SET name = name || ' g1' WHERE id = 3")
    wait_until("destination search disabled", lambda: state(db, "search") == "disabled")
    assert "CDE-208 destination search is gone" in SERVER_LOG.read_text()
    requests = len(search.log())
    db.run("UPDATE categories SET name = name || ' g2' WHERE id = 3")
    time.sleep(2.5)   # two retry intervals: a held destination would have been probed by now
    assert len(search.log()) == requests, "a disabled destination got a request"
    assert db.one("SELECT status FROM cde.feed_categories WHERE key = '3'") == "pending"
    db.run("SELECT cde_set_destination('search', endpoint, options) FROM cde.destinations WHERE name = 'search'")
    wait_until("the change delivered", lambda: search.doc("categories", 3)["data"]["name"].endswith(" g1 g2"))
    assert state(db, "search") == "ok"


def test_a_rejected_item_shows_the_response_that_rejected_it(shop, sinks):
    db = shop
    erp = sinks["erp"]
    erp.fault(feed="prices", reject={"key": "4", "error": "no such product"})
    db.run("UPDATE prices SET amount = amount + 1 WHERE product_id IN (3, 4)")
    wait_until("the rejection", lambda: db.one("SELECT count(*) FROM cde_failed_items WHERE feed = 'prices'") == 1)
    response_id = db.one("SELECT response_id FROM cde_failed_items WHERE feed = 'prices' AND key = '4'")
    assert response_id in {r["request_id"] for r in erp.log("prices")}
    erp.clear_faults()


def test_a_missing_secret_file_is_failing_not_a_crash(shop, sinks, secrets):
    db = shop
    search = sinks["search"]
    path = secrets("vanishing.whsec", SECRET)
    db.run("SELECT cde_set_destination('search', endpoint, options || jsonb_build_object('signing_secret_file', %s::text)) "
           "FROM cde.destinations WHERE name = 'search'", path)
    pid = db.worker_pid()
    requests = len(search.log())
    os.rename(path, path + ".away")
    db.configure(retry_interval="1s")   # a reload: every file is read again
    wait_until("destination search failing", lambda: state(db, "search") == "failing")
    # The view says what is wrong, not where the file is; the log names it.
    assert db.one("SELECT last_error FROM cde_destinations WHERE name = 'search'") == \
        "cannot read signing_secret_file: No such file or directory (os error 2)"
    assert f"CDE-206 destination search: cannot read signing_secret_file {path}" in SERVER_LOG.read_text()
    db.run("UPDATE categories SET name = name || ' s1' WHERE id = 4")
    time.sleep(1.5)
    assert len(search.log()) == requests, "sent unsigned, or with no secret"
    assert db.worker_pid() == pid
    os.rename(path + ".away", path)
    db.configure(retry_interval="1s")
    wait_until("the change delivered, signed", lambda: search.doc("categories", 4)["data"]["name"].endswith(" s1"))
    Webhook(SECRET).verify(search.log()[-1]["body"], search.log()[-1]["webhook"])


def test_a_monitor_reads_destinations_and_no_secret(shop):
    db = shop
    db.run("DROP ROLE IF EXISTS e2e_monitor")
    db.run("CREATE ROLE e2e_monitor LOGIN IN ROLE pg_monitor")
    try:
        with connect() as conn:
            conn.execute("SET ROLE e2e_monitor")
            rows = conn.execute("SELECT * FROM cde_destinations").fetchall()
            text = repr(rows)
            assert {r[0] for r in rows} == {"default", "search", "erp"}
            assert "erp-key" not in text and "whsec" not in text and "cde-e2e-secrets" not in text
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT options FROM cde.destinations")
    finally:
        db.run("DROP ROLE e2e_monitor")
