-- A monitor (pg_monitor) and an application writer: the monitor reads the views and nothing
-- else of cde, and no secret; the writer's changes are captured, and it can manage nothing. The
-- API key is only ever read from the server's configuration and never shown.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
SET cde.endpoint = '';
BEGIN;
CREATE TABLE products (id bigint PRIMARY KEY, name text);
INSERT INTO products VALUES (1, 'one'), (2, 'two');
SELECT cde_register_feed('products', 'SELECT id, name FROM products');
SELECT cde_track('products', 'products');
CREATE ROLE regress_monitor IN ROLE pg_monitor;
CREATE ROLE regress_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON products TO regress_writer;

SET ROLE regress_monitor;
SELECT feed, items, pending FROM cde_feed_status;
SELECT count(*) FROM cde_failed_items;
SELECT count(*) FROM cde_sync_runs;
SELECT count(*) FROM cde_worker_status;
SELECT count(*) FROM cde.feed_products;
SELECT count(*) FROM cde.feeds;
SELECT cde_sync_now();
SHOW cde.api_key;
SELECT current_setting('cde.api_key') AS api_key;
SELECT count(*) AS api_key_rows FROM pg_settings WHERE name = 'cde.api_key';
SELECT count(*) FROM pg_file_settings;
RESET ROLE;

SET ROLE regress_writer;
UPDATE products SET name = 'uno' WHERE id = 1;
SELECT count(*) FROM cde.queue;
SELECT count(*) FROM cde_feed_status;
SELECT cde_register_feed('mine', 'SELECT 1 AS id');
SELECT cde_track('products', 'products');
SELECT cde_drop_feed('products');
SELECT cde_full_sync();
SELECT cde_sync_now();
SELECT cde_retry_failed();
SELECT cde_resync('products', ARRAY['1']);
SELECT cde_grant_admin('regress_writer');
SET cde.endpoint = 'http://127.0.0.1:1/stolen';
RESET ROLE;
SELECT feed, collected FROM cde_sync_now();
SELECT key, doc FROM cde.feed_products ORDER BY key;

-- The key: not from a session, a database or a role (each is readable by others), and shown to
-- nobody, a superuser included.
SET cde.api_key = 'top-secret';
ALTER DATABASE cde_regress SET cde.api_key = 'top-secret';
ALTER ROLE regress_writer SET cde.api_key = 'top-secret';
SHOW cde.api_key;
-- No credentials in the endpoint, which everybody may read.
SET cde.endpoint = 'https://user:secret@example.com/ingest';
ROLLBACK;
