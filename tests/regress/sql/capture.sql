-- Change capture: statement-level triggers record the touched keys, once per statement.
\i sql/fresh.inc
SET cde.endpoint = '';

CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, category_id int REFERENCES categories);
CREATE TABLE prices (product_id bigint REFERENCES products ON DELETE CASCADE, currency text, amount numeric,
                     PRIMARY KEY (product_id, currency));
CREATE VIEW product_names AS SELECT id, sku FROM products;

SELECT cde_register_feed('products',
    $$SELECT p.id, jsonb_build_object('sku', p.sku, 'category', c.name,
             'prices', (SELECT jsonb_object_agg(currency, amount) FROM prices WHERE product_id = p.id)) AS doc
        FROM products p LEFT JOIN categories c ON c.id = p.category_id$$);
SELECT cde_track('products', 'products');                       -- keys: the feed's key column, id
SELECT cde_track('products', 'prices', 'product_id');           -- an expression over the changed row
SELECT cde_track('products', 'categories',                      -- a query over "changed"
    'SELECT p.id FROM products p JOIN changed c ON p.category_id = c.id');
SELECT feed, table_name, keys FROM cde.tracks ORDER BY table_name;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal ORDER BY tgname;

-- What the queue holds, one row per statement. cde._capture does not deduplicate (the collector
-- does, once for many statements): show each statement's distinct keys, sorted.
CREATE FUNCTION queued() RETURNS TABLE (feed text, keys text[], all_keys boolean)
LANGUAGE sql AS $$ SELECT feed, ARRAY(SELECT DISTINCT unnest(keys) ORDER BY 1), all_keys FROM cde.queue ORDER BY id $$;

INSERT INTO categories VALUES (1, 'Shoes'), (2, 'Hats');
INSERT INTO products VALUES (1, 'A', 1), (2, 'B', 1), (3, 'C', 2);    -- one statement, three rows
SELECT * FROM queued();
DELETE FROM cde.queue;

UPDATE products SET sku = sku || '!' WHERE id IN (1, 3);
INSERT INTO prices VALUES (2, 'EUR', 10), (2, 'USD', 11);
DELETE FROM products WHERE id = 3;                                   -- cascades to nothing here
UPDATE products SET sku = sku WHERE false;                           -- no row: nothing queued
SELECT * FROM queued();
DELETE FROM cde.queue;

-- Dependent keys: renaming a category touches its products.
UPDATE categories SET name = 'Boots' WHERE id = 1;
-- Moving a product between categories: old and new row images both count.
UPDATE products SET category_id = 2 WHERE id = 2;
SELECT * FROM queued();
DELETE FROM cde.queue;

-- A rollback leaves nothing behind.
BEGIN;
UPDATE products SET sku = 'rolled back' WHERE id = 1;
ROLLBACK;
SELECT count(*) AS queued_after_rollback FROM cde.queue;

-- TRUNCATE: every key may have changed.
TRUNCATE prices;
SELECT * FROM queued();
DELETE FROM cde.queue;

-- A statement's keys go in rows of at most cde._chunk_size() keys, whichever trigger queues
-- them: collecting a bulk write then takes a bounded slice at a time.
SELECT cde._chunk_size();
INSERT INTO products SELECT g, 'bulk', 1 FROM generate_series(100, 12099) AS g;    -- cde._capture
UPDATE categories SET name = 'Clogs' WHERE id = 1;    -- cde._capture_keys: its 12,001 products, once each
SELECT feed, cardinality(keys) FROM cde.queue ORDER BY id;
DELETE FROM products WHERE id >= 100;
DELETE FROM cde.queue;

-- Several feeds may track one table; tracking again for the same feed replaces the definition.
SELECT cde_register_feed('skus', 'SELECT id, sku FROM products');
SELECT cde_track('skus', 'products');
SELECT cde_track('products', 'prices', 'SELECT product_id FROM changed');
SELECT feed, table_name, keys FROM cde.tracks ORDER BY feed, table_name;
INSERT INTO prices VALUES (1, 'EUR', 5);
UPDATE products SET sku = 'A2' WHERE id = 1;
SELECT * FROM queued();
DELETE FROM cde.queue;

-- An application role that may only write the tracked table needs nothing of cde's.
CREATE ROLE regress_cde_writer LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON products TO regress_cde_writer;
SET ROLE regress_cde_writer;
SET search_path = pg_temp, public;   -- a hostile search_path does not reach capture
UPDATE products SET sku = 'by app' WHERE id = 2;
SELECT count(*) FROM cde.queue;      -- and it cannot read cde's tables
RESET ROLE;
RESET search_path;
SELECT * FROM queued();
DELETE FROM cde.queue;

-- Bad input.
SELECT cde_track('nope', 'products');
SELECT cde_track('products', 'no_such_table');
SELECT cde_track('products', 'product_names');
SELECT cde_track('products', 'prices', 'no_such_column');
SELECT cde_track('products', 'prices', 'SELECT x FROM changed');
SELECT cde_untrack('products', 'product_names');
SELECT cde_untrack('skus', 'prices');

-- Untrack and drop remove their triggers.
SELECT cde_untrack('products', 'categories');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'categories'::regclass AND NOT tgisinternal;
SELECT cde_drop_feed('skus');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal ORDER BY tgname;

-- A tracked table may be renamed: its triggers follow it. An ALTER TABLE that breaks the keys
-- of a tracking is refused, rather than every later write failing.
CREATE TABLE stock (sku text PRIMARY KEY, product_id bigint, qty int);
SELECT cde_track('products', 'stock', 'product_id');
ALTER TABLE stock RENAME TO inventory;
INSERT INTO inventory VALUES ('A', 1, 5);
SELECT * FROM queued();
DELETE FROM cde.queue;
SELECT feed, table_name, keys FROM cde.tracks WHERE keys = 'product_id';
ALTER TABLE inventory DROP COLUMN product_id;
ALTER TABLE inventory RENAME COLUMN product_id TO pid;
ALTER TABLE inventory ADD COLUMN note text;                    -- harmless changes pass
SELECT cde_untrack('products', 'inventory');
ALTER TABLE inventory DROP COLUMN product_id;
DROP TABLE inventory;

-- Keys that are a column of the changed row are captured by cde._capture; keys that are an
-- expression or a query, by cde._capture_keys (both in Rust), its arguments naming those feeds.
-- One table may have both kinds; TRUNCATE always goes through cde._capture. Both queue the same way.
SELECT cde_register_feed('price_rows', 'SELECT product_id, currency FROM prices', 'product_id');
SELECT cde_track('price_rows', 'prices');
SELECT tgname, tgfoid::regproc AS function, tgnargs
  FROM pg_trigger WHERE tgrelid = 'prices'::regclass AND NOT tgisinternal ORDER BY tgname;
INSERT INTO prices VALUES (2, 'USD', 7), (2, 'GBP', 6);
UPDATE prices SET product_id = 1 WHERE product_id = 2 AND currency = 'GBP';   -- old and new keys
SELECT * FROM queued();
DELETE FROM cde.queue;

-- A tracked table that is dropped is forgotten.
DROP TABLE prices;
SELECT feed, table_name FROM cde.tracks ORDER BY table_name;

REVOKE ALL ON products FROM regress_cde_writer;
DROP ROLE regress_cde_writer;
