-- Writes applied by logical replication run with session_replication_role = replica, where
-- ordinary triggers do not fire (and the apply worker fires row triggers only). A track made
-- with replicated => true adds row triggers enabled for replica sessions only: those writes are
-- captured for its feed, once; other feeds of the table do not see them. A session in replica
-- mode stands for the apply worker here (tests/e2e/test_replication.py has the real one).
\i sql/fresh.inc
BEGIN;
SET cde.endpoint = '';
CREATE TABLE stock (product_id int, store text, quantity int, PRIMARY KEY (product_id, store));
SELECT cde_register_feed('stock', 'SELECT product_id, store, quantity FROM stock', key_columns => '{product_id,store}');
SELECT cde_register_feed('levels', 'SELECT product_id AS id, sum(quantity) AS total FROM stock GROUP BY product_id');
SELECT cde_track('stock', 'stock', replicated => true);
SELECT cde_track('levels', 'stock', 'product_id');
SELECT feed, source_table, keys, replicated FROM cde.tracks ORDER BY feed;
SELECT tgname, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'stock'::regclass ORDER BY tgname;

-- Replicated writes: queued for stock (each row's keys, old and new), not for levels.
SET session_replication_role = replica;
INSERT INTO stock VALUES (1, 'berlin', 5), (2, 'paris|nord', 7);
UPDATE stock SET store = 'lyon' WHERE product_id = 1;
DELETE FROM stock WHERE product_id = 2;
SELECT feed, keys FROM cde.queue ORDER BY id;
TRUNCATE stock;
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id DESC LIMIT 1;
RESET session_replication_role;
DELETE FROM cde.queue;

-- A local write: captured once for each feed, by the statement triggers.
INSERT INTO stock VALUES (3, 'berlin', 1);
SELECT feed, keys FROM cde.queue ORDER BY feed;

-- Asked no more: the row triggers go.
SELECT cde_track('stock', 'stock');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'stock'::regclass AND tgname LIKE 'cde\_capture\_replica\_%';
SAVEPOINT s;
SELECT cde_track('stock', 'stock', replicated => NULL);
ROLLBACK TO s;

-- A partitioned table: the row triggers are on its partitions (each gets its own), not on it.
CREATE TABLE moves (id int, at date, qty int) PARTITION BY RANGE (at);
CREATE TABLE moves_2026 PARTITION OF moves FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
SELECT cde_register_feed('moves', 'SELECT id, at, qty FROM moves', key_columns => '{id,at}');
SELECT cde_track('moves', 'moves', replicated => true);
SELECT tgrelid::regclass, tgname, tgenabled FROM pg_trigger
 WHERE tgrelid IN ('moves'::regclass, 'moves_2026'::regclass) AND tgname LIKE 'cde\_capture\_replica\_%' ORDER BY 1, 2;
SET session_replication_role = replica;
INSERT INTO moves VALUES (1, '2026-03-01', 4);
RESET session_replication_role;
SELECT feed, keys FROM cde.queue WHERE feed = 'moves';

-- Only the table's owner (or a member of it) may capture its replicated writes, as only it may
-- ENABLE REPLICA TRIGGER; the TRIGGER privilege is enough for the rest.
CREATE ROLE regress_tracker;
SELECT cde_grant_admin('regress_tracker');
GRANT SELECT, TRIGGER ON stock TO regress_tracker;
SET ROLE regress_tracker;
SELECT cde_register_feed('theirs', 'SELECT product_id AS id FROM stock GROUP BY product_id');
SAVEPOINT t;
SELECT cde_track('theirs', 'stock', 'product_id', replicated => true);
ROLLBACK TO t;
SELECT cde_track('theirs', 'stock', 'product_id');
RESET ROLE;
SELECT feed, replicated FROM cde.tracks WHERE feed = 'theirs';
ROLLBACK;
