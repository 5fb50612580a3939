-- Registering feeds: the definition, what cde generates for it, and every refusal.
\i sql/fresh.inc
SET cde.endpoint = '';

CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, category_id int REFERENCES categories, price numeric);

-- Without a doc column, the document is the whole row.
SELECT cde_register_feed('categories', 'SELECT id, name FROM categories');
-- With one, the document is that column; the key keeps its own type (bigint here).
SELECT cde_register_feed('products',
    $$SELECT p.id, jsonb_build_object('sku', p.sku, 'category', c.name, 'price', p.price) AS doc
        FROM products p LEFT JOIN categories c ON c.id = p.category_id;$$,
    depends_on => '{categories}', batch_size => 100);
SELECT name, key_columns, key_types, doc_column, mode, depends_on, batch_size, feed_table
  FROM cde.feeds ORDER BY name;
SELECT name, depth FROM cde._feeds_in_order();

-- The feed table, documented column by column in docs/operations.md.
SELECT column_name, data_type FROM information_schema.columns
 WHERE table_schema = 'cde' AND table_name = 'feed_products' ORDER BY ordinal_position;

-- Registering again updates the definition.
SELECT cde_register_feed('categories', 'SELECT id, name, length(name) AS name_length FROM categories', mode => 'legacy');
SELECT name, mode, source_query FROM cde.feeds WHERE name = 'categories';

-- Bad input: a clear error each time, and nothing half-registered.
SELECT cde_register_feed('Products', 'SELECT 1 AS id');
SELECT cde_register_feed('drop table x', 'SELECT 1 AS id');
SELECT cde_register_feed(NULL, 'SELECT 1 AS id');
SELECT cde_register_feed('a', 'SELECT 1 AS id', mode => 'sometimes');
SELECT cde_register_feed('a', 'SELEC 1 AS id');
SELECT cde_register_feed('a', 'SELECT * FROM no_such_table');
SELECT cde_register_feed('a', 'SELECT id, name FROM categories FOR UPDATE');
SELECT cde_register_feed('a', 'SELECT 1 AS ident');
SELECT cde_register_feed('a', 'SELECT 1 AS id', key_column => 'sku');
SELECT cde_register_feed('a', '');
SELECT cde_register_feed('a', 'SELECT 1 AS id, 42 AS doc');
SELECT cde_register_feed('a', 'SELECT 1 AS id', depends_on => '{nope}');
SELECT cde_register_feed('a', 'SELECT 1 AS id', depends_on => '{a}');
SELECT cde_register_feed('a', 'SELECT 1 AS id', batch_size => 0);
-- A cycle: categories -> products -> categories.
SELECT cde_register_feed('categories', 'SELECT id, name FROM categories', depends_on => '{products}');
SELECT count(*) AS feeds FROM cde.feeds;
SELECT count(*) AS feed_tables FROM pg_tables WHERE schemaname = 'cde' AND tablename LIKE 'feed\_%';

-- Dropping: refused while another feed depends on it; then everything goes.
SELECT cde_drop_feed('categories');
SELECT cde_drop_feed('nope');
SELECT cde_drop_feed('products');
SELECT cde_drop_feed('categories');
SELECT count(*) AS feeds FROM cde.feeds;
SELECT count(*) AS leftovers FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'cde' AND c.relname LIKE 'feed\_%';
SELECT count(*) AS leftover_functions FROM pg_proc WHERE pronamespace = 'cde'::regnamespace AND proname LIKE 'rebuild\_%';

DROP TABLE products, categories;
