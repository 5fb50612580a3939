-- Any valid query registers: dollar quotes of any tag, a trailing comment, CTEs, tables outside
-- public through the registrant's search_path. What cannot be used gets an ERROR naming it.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
CREATE SCHEMA shop;
CREATE TABLE shop.items (id int PRIMARY KEY, name text);
INSERT INTO shop.items VALUES (1, 'one'), (2, 'two $body$ and $q$');
SELECT cde_register_feed('dollars', $x$SELECT id, name || $body$ (body)$body$ || $q$ q$q$ AS name FROM shop.items$x$);
SELECT cde_register_feed('commented', E'SELECT id, name FROM shop.items -- the items\n-- and a last comment');
SELECT cde_register_feed('cte', 'WITH named AS (SELECT id, upper(name) AS name FROM shop.items) SELECT id, name FROM named');
SET search_path = shop, public;
SELECT cde_register_feed('pathed', 'SELECT id, name FROM items');
RESET search_path;
SELECT cde_register_feed('explicit', 'SELECT id, name FROM items', search_path => '{shop}');
SELECT name, search_path FROM cde.feeds ORDER BY name;
-- Each builds, whatever the session's search_path now.
SELECT cde._rebuild(f.name, NULL) FROM cde.feeds f ORDER BY f.name;
SELECT f.name, t.key, t.doc->>'name' AS name
  FROM cde.feeds f, LATERAL (SELECT * FROM cde._source(f.name, 'keys', '{2}')) t ORDER BY 1;
-- What cannot be used.
SELECT cde_register_feed('nokey', 'SELECT 1 AS x');
SELECT cde_register_feed('unknown', 'SELECT id FROM no_such_table');
SELECT cde_register_feed('notpathed', 'SELECT id, name FROM items');
SELECT cde_register_feed('twostatements', 'SELECT 1 AS id; SELECT 2 AS id');
SELECT cde_register_feed('empty', '  ;  ');
SELECT cde_register_feed('baddoc', 'SELECT id, name AS doc FROM shop.items');
ROLLBACK;
