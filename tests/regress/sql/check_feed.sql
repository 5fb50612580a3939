-- cde_check_feed(feed): what would make a feed misbehave. A sound feed gives no rows; each
-- problem below gives its own.
\i sql/fresh.inc
BEGIN;
SET cde.endpoint = '';
CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (id int PRIMARY KEY, sku text NOT NULL, category_id int REFERENCES categories, price numeric);
CREATE TABLE tags (product_id int, tag text);
INSERT INTO categories SELECT g, 'Category ' || g FROM generate_series(1, 5) AS g;
INSERT INTO products SELECT g, 'SKU-' || g, 1 + g % 5, g FROM generate_series(1, 5000) AS g;
INSERT INTO tags SELECT g, t FROM generate_series(1, 5000) AS g, unnest('{red,blue,green}'::text[]) AS t;
CREATE INDEX ON tags (product_id);   -- without it, rebuilding a product reads every tag (see by_sku below)
ANALYZE categories, products, tags;

-- Sound: keyed by the primary key, deterministic, small documents. No rows.
SELECT cde_register_feed('sound', $$SELECT p.id, jsonb_build_object('sku', p.sku, 'category', c.name,
        'tags', (SELECT jsonb_agg(t.tag ORDER BY t.tag) FROM tags t WHERE t.product_id = p.id)) AS doc
    FROM products p JOIN categories c ON c.id = p.category_id$$);
SELECT * FROM cde_check_feed('sound');

-- random() in the document: every key differs between two builds, and the query is named.
SELECT cde_register_feed('dice', 'SELECT id, sku, random() AS luck FROM products');
SELECT count(*) AS keys, min(key::int), max(key::int), min(problem) = max(problem) AS one_problem
  FROM cde_check_feed('dice') WHERE key IS NOT NULL;
SELECT DISTINCT left(problem, 80) FROM cde_check_feed('dice');
-- Bounded: the first "sample" keys in key order.
SELECT count(*) FROM cde_check_feed('dice', sample => 10) WHERE key IS NOT NULL;

-- NULL and duplicate keys.
INSERT INTO tags VALUES (NULL, 'orphan');
SELECT cde_register_feed('by_tag', 'SELECT t.product_id AS id, t.tag FROM tags t');
SELECT * FROM cde_check_feed('by_tag') ORDER BY key NULLS FIRST, problem LIMIT 3;

-- A document larger than a batch to its destination may be.
SELECT cde_set_destination('small', 'http://127.0.0.1:9/ingest', '{"max_batch_bytes": 1024}');
SELECT cde_register_feed('big', $$SELECT id, repeat('x', CASE WHEN id = 42 THEN 2000 ELSE 10 END) AS blob FROM products$$,
                         destination => 'small');
SELECT * FROM cde_check_feed('big');

-- A key no index serves: rebuilding a few keys reads products whole.
SELECT cde_register_feed('by_sku', 'SELECT lower(sku) AS id, price FROM products');
SELECT * FROM cde_check_feed('by_sku');

-- Documents that changed with no change captured: a table the feed reads is not tracked.
SELECT cde_track('sound', 'products');
SELECT * FROM cde._rebuild('sound', NULL);
UPDATE categories SET name = 'Renamed' WHERE id = 2;    -- categories is not tracked
SELECT count(*), min(problem) FROM cde_check_feed('sound') GROUP BY left(problem, 40);
SELECT cde_track('sound', 'categories', 'SELECT p.id FROM products p JOIN changed c ON c.id = p.category_id');
UPDATE categories SET name = 'Renamed again' WHERE id = 2;   -- now captured: queued, not a problem
SELECT count(*) FROM cde_check_feed('sound');

-- Who may: the feed's manager only; a bad sample is refused.
SAVEPOINT s;
SELECT * FROM cde_check_feed('sound', sample => 0);
ROLLBACK TO s;
SELECT * FROM cde_check_feed('nope');
ROLLBACK TO s;
CREATE ROLE regress_checker;
SET ROLE regress_checker;
SELECT * FROM cde_check_feed('sound');
ROLLBACK TO s;
ROLLBACK;
