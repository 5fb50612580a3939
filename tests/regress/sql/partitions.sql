-- Writes that name a partition, a sub-partition or an inheritance child are captured, once, by
-- the table they name: every table under a tracked one gets its capture triggers, those created
-- or attached later too. Rows that come in or go out by DDL (ATTACH, DETACH, DROP of a
-- partition) give the feed a full sync. What cannot be captured is refused.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
SET cde.endpoint = '';
CREATE TABLE payment (payment_id int, paid date, amount numeric, PRIMARY KEY (payment_id, paid)) PARTITION BY RANGE (paid);
CREATE TABLE payment_01 PARTITION OF payment FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE payment_02 PARTITION OF payment FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') PARTITION BY HASH (payment_id);
CREATE TABLE payment_02_h0 PARTITION OF payment_02 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE payment_02_h1 PARTITION OF payment_02 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
INSERT INTO payment SELECT g, '2026-01-20'::date + g, g FROM generate_series(1, 20) g;
SELECT cde_register_feed('payments', 'SELECT payment_id, sum(amount) AS total FROM payment GROUP BY payment_id', 'payment_id');
SELECT cde_track('payments', 'payment');
SELECT tgrelid::regclass AS "table", count(*) AS capture_triggers
  FROM pg_trigger WHERE tgname LIKE 'cde\_capture\_%' GROUP BY 1 ORDER BY 1::text;
DELETE FROM cde.queue;

-- Writes naming the parent, a partition, a sub-partition: each captured once.
UPDATE payment SET amount = amount + 1 WHERE payment_id = 1;
UPDATE payment_01 SET amount = amount + 1 WHERE payment_id = 2;
UPDATE payment_02_h0 SET amount = amount + 1 WHERE payment_id BETWEEN 15 AND 18;
DELETE FROM payment_02 WHERE payment_id = 20;
SELECT feed, keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;

-- A partition created later is captured; its first rows come by DML.
CREATE TABLE payment_03 PARTITION OF payment FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
INSERT INTO payment_03 VALUES (100, '2026-03-05', 5);
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;

-- Attached with rows, detached with rows: a full sync of the feed (all_keys).
CREATE TABLE payment_04 (LIKE payment);
INSERT INTO payment_04 VALUES (200, '2026-04-05', 7);
ALTER TABLE payment ATTACH PARTITION payment_04 FOR VALUES FROM ('2026-04-01') TO ('2026-05-01');
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
UPDATE payment_04 SET amount = 8;
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;
ALTER TABLE payment DETACH PARTITION payment_04;
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
SELECT count(*) AS capture_triggers_on_the_detached FROM pg_trigger WHERE tgrelid = 'payment_04'::regclass AND tgname LIKE 'cde\_capture%';
UPDATE payment_04 SET amount = 9;                     -- no longer the feed's
DELETE FROM cde.queue;

-- TRUNCATE of a partition, DROP of one with its rows: a full sync.
TRUNCATE payment_01;
SELECT feed, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;
DROP TABLE payment_03;
SELECT feed, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;

-- Inheritance: a child's own writes, a child made later, one that stops inheriting.
CREATE TABLE item (id int PRIMARY KEY, name text);
CREATE TABLE item_special (note text) INHERITS (item);
SELECT cde_register_feed('items', 'SELECT id, name FROM item');
SELECT cde_track('items', 'item', 'id * 1');
INSERT INTO item_special VALUES (7, 'seven', 'special');
CREATE TABLE item_later () INHERITS (item);
INSERT INTO item_later VALUES (8, 'eight');
UPDATE item SET name = upper(name);                  -- the parent's statement: every row, once
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;
ALTER TABLE item_later NO INHERIT item;
SELECT feed, keys, all_keys FROM cde.queue ORDER BY id;
DELETE FROM cde.queue;

-- Untracking takes the triggers from every table under it.
SELECT cde_untrack('payments', 'payment');
SELECT count(*) AS capture_triggers_left FROM pg_trigger WHERE tgname LIKE 'cde\_capture%' AND tgrelid::regclass::text LIKE 'payment%';

-- A foreign table cannot be captured: refused when tracking, and when it would come under a
-- tracked table.
CREATE EXTENSION file_fdw;
CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
CREATE TABLE ledger (id int, at date) PARTITION BY RANGE (at);
CREATE FOREIGN TABLE ledger_archive PARTITION OF ledger FOR VALUES FROM ('2000-01-01') TO ('2001-01-01')
    SERVER files OPTIONS (filename '/dev/null');
SELECT cde_register_feed('ledger', 'SELECT id FROM ledger');
SELECT cde_track('ledger', 'ledger');
DROP FOREIGN TABLE ledger_archive;
SELECT cde_track('ledger', 'ledger');
CREATE FOREIGN TABLE ledger_archive PARTITION OF ledger FOR VALUES FROM ('2000-01-01') TO ('2001-01-01')
    SERVER files OPTIONS (filename '/dev/null');
ROLLBACK;
