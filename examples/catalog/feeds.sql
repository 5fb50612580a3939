-- The sample catalog's feeds, in dependency order, and what each tracks.

SELECT cde_register_feed('attributes',
    'SELECT id, code, label, type FROM attributes');
SELECT cde_track('attributes', 'attributes');

SELECT cde_register_feed('categories',
    $$SELECT c.id, jsonb_build_object('id', c.id, 'name', c.name, 'parent_id', c.parent_id) AS doc
        FROM categories c$$,
    depends_on => '{attributes}');
SELECT cde_track('categories', 'categories');

SELECT cde_register_feed('products',
    $$SELECT p.id,
             jsonb_build_object(
                 'id', p.id, 'sku', p.sku, 'name', p.name, 'description', p.description,
                 'category', jsonb_build_object('id', c.id, 'name', c.name),
                 'attributes', (SELECT coalesce(jsonb_object_agg(a.code, pa.value), '{}')
                                  FROM product_attributes pa JOIN attributes a ON a.id = pa.attribute_id
                                 WHERE pa.product_id = p.id),
                 'prices', (SELECT coalesce(jsonb_object_agg(pr.currency, pr.amount), '{}')
                              FROM prices pr WHERE pr.product_id = p.id)) AS doc
        FROM products p LEFT JOIN categories c ON c.id = p.category_id$$,
    depends_on => '{categories}');
SELECT cde_track('products', 'products');
SELECT cde_track('products', 'prices', 'product_id');
SELECT cde_track('products', 'product_attributes', 'product_id');
-- Renaming a category or an attribute touches the products that show it.
SELECT cde_track('products', 'categories', 'SELECT p.id FROM products p JOIN changed c ON p.category_id = c.id');
SELECT cde_track('products', 'attributes', 'SELECT pa.product_id FROM product_attributes pa JOIN changed c ON pa.attribute_id = c.id');

SELECT cde_register_feed('prices',
    $$SELECT product_id, jsonb_build_object('product_id', product_id, 'prices', jsonb_object_agg(currency, amount)) AS doc
        FROM prices GROUP BY product_id$$,
    key_column => 'product_id', mode => 'legacy', depends_on => '{products}');
SELECT cde_track('prices', 'prices');

SELECT cde_register_feed('product_relations',
    'SELECT id, product_id, related_id, kind FROM product_relations',
    depends_on => '{products}');
SELECT cde_track('product_relations', 'product_relations');

-- Stock per (product, store): a key of two columns, sent as "<product_id>|<store>"
-- (docs/protocol.md, "Keys"). Renaming a store touches every stock row of it.
SELECT cde_register_feed('stock',
    $$SELECT s.product_id, s.store, jsonb_build_object('product_id', s.product_id, 'store', s.store,
                                                     'store_name', st.name, 'quantity', s.quantity) AS doc
        FROM stock s JOIN stores st ON st.code = s.store$$,
    key_columns => '{product_id,store}', depends_on => '{products}');
SELECT cde_track('stock', 'stock');
SELECT cde_track('stock', 'stores', 'SELECT s.product_id, s.store FROM stock s JOIN changed c ON c.code = s.store');
