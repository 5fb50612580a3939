-- An outcome is recorded on the row that was sent, found where the worker read it. A row that
-- moved since with the same document and state (a collect during a full sync rewrites rows as
-- they are, sql/rebuild.sql) is found by key: it was delivered, and is not sent again. A row
-- written again meanwhile stays pending, and its newer version goes next.
\i sql/fresh.inc
BEGIN;
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 3) g;
SELECT cde_register_feed('items', 'SELECT id, name FROM items');
SELECT built FROM cde._rebuild('items', NULL);
-- What the worker read and sent: every row, where it was.
CREATE TEMP TABLE sent_items AS SELECT key, ctid AS tid, hash, modified_at FROM cde.feed_items WHERE status = 'pending';
-- Meanwhile row 1 is rewritten as it is (it moves), item 2 changes, and item 3 is written again
-- with the same document (it changed and changed back: a newer version, which may have gone out
-- after a version in between; "now()" is this transaction's, hence the second added by hand).
UPDATE cde.feed_items SET hash = hash WHERE key = '1';
UPDATE cde.feed_items SET modified_at = modified_at + interval '1 second' WHERE key = '3';
UPDATE items SET name = 'item 2, changed' WHERE id = 2;
SELECT changed FROM cde._rebuild('items', '{2}');
SELECT f.key, f.ctid = s.tid AS where_read FROM cde.feed_items f JOIN sent_items s USING (key) ORDER BY key;
SELECT (cde._record('items', array_agg(key), array_agg(tid), array_agg(hash), array_agg('sent'::cde.outcome),
                    array_agg(200), array_agg(NULL::text), NULL, array_agg('r-1'::text), array_agg(modified_at))).*
  FROM sent_items;
SELECT key, doc->>'name' AS name, status, response_id FROM cde.feed_items ORDER BY key;
ROLLBACK;
