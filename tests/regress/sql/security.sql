-- Least privilege: who may read, who may manage, and what stays hidden.
\i sql/fresh.inc
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_cde_monitor;
DROP ROLE IF EXISTS regress_cde_app;
DROP ROLE IF EXISTS regress_cde_admin;
RESET client_min_messages;
SET cde.endpoint = '';
SET cde.api_key = 'top-secret';

CREATE TABLE products (id bigint PRIMARY KEY, name text);
INSERT INTO products VALUES (1, 'one'), (2, 'two');
SELECT cde_register_feed('products', 'SELECT id, name FROM products');
SELECT cde_track('products', 'products');

CREATE ROLE regress_cde_monitor IN ROLE pg_monitor;
CREATE ROLE regress_cde_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON products TO regress_cde_app;

-- A monitoring role reads the views, and nothing else of cde.
SET ROLE regress_cde_monitor;
SELECT feed, items, pending FROM cde_feed_status;
SELECT count(*) FROM cde_failed_items;
SELECT count(*) FROM cde_sync_runs;
SELECT count(*) FROM cde_worker_status;
SELECT count(*) FROM cde.feed_products;
SELECT cde_sync_now();
RESET ROLE;

-- An application role writes the tracked table, and its changes are captured; it cannot read
-- cde's tables, manage feeds, run a sync, or see the API key.
SET ROLE regress_cde_app;
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
SHOW cde.api_key;
SELECT count(*) AS api_key_rows FROM pg_settings WHERE name = 'cde.api_key';
SET cde.endpoint = 'http://127.0.0.1:1/stolen';
RESET ROLE;

SELECT feed, collected FROM cde_sync_now();
SELECT key, doc FROM cde.feed_products ORDER BY key;

-- Management delegated to a role that is not a superuser: it registers a feed over what it may
-- read, and its source query runs with its rights, not the worker's.
CREATE ROLE regress_cde_admin;
SELECT cde_grant_admin('regress_cde_admin');
CREATE TABLE orders (id int PRIMARY KEY, total numeric);
CREATE TABLE secrets (id int PRIMARY KEY, secret text);
INSERT INTO orders VALUES (1, 10), (2, 20);
INSERT INTO secrets VALUES (1, 'hunter2');
GRANT SELECT, TRIGGER ON orders TO regress_cde_admin;
ALTER TABLE orders OWNER TO regress_cde_admin;
SET ROLE regress_cde_admin;
SELECT cde_register_feed('orders', 'SELECT id, total FROM orders');
SELECT cde_track('orders', 'orders');
SELECT cde_register_feed('leak', 'SELECT id, secret FROM secrets');    -- checked at registration
UPDATE orders SET total = 11 WHERE id = 1;
SELECT feed, collected FROM cde_sync_now('orders');
SELECT feed, pending FROM cde_feed_status WHERE feed = 'orders';
RESET ROLE;
-- Later revoked: the feed's query keeps the registering role's rights, even run by a superuser.
REVOKE SELECT ON orders FROM regress_cde_admin;
ALTER TABLE orders OWNER TO postgres;
UPDATE orders SET total = 12 WHERE id = 1;
SELECT feed, collected, failed FROM cde_sync_now('orders');
SELECT key, status, error FROM cde.feed_orders ORDER BY key;

SELECT cde_drop_feed('orders');
DROP TABLE orders, secrets;
REVOKE ALL ON products FROM regress_cde_app;
DROP ROLE regress_cde_app;
DROP ROLE regress_cde_monitor;
DROP OWNED BY regress_cde_admin;
DROP ROLE regress_cde_admin;
