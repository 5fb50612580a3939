-- A sample commerce catalog: attributes, categories, products with attribute values and prices,
-- product relations, and stock per (product, store). Size: psql -v products=N (default 1000).
\if :{?products}
\else
\set products 1000
\endif

DROP TABLE IF EXISTS stock, stores, product_relations, prices, product_attributes, products, categories, attributes CASCADE;

CREATE TABLE attributes (
    id     int PRIMARY KEY,
    code   text NOT NULL UNIQUE,
    label  text NOT NULL,
    type   text NOT NULL DEFAULT 'text'
);
CREATE TABLE categories (
    id        int PRIMARY KEY,
    parent_id int REFERENCES categories,
    name      text NOT NULL
);
CREATE TABLE products (
    id          bigint PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    category_id int REFERENCES categories,
    description text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON products (category_id);
CREATE TABLE product_attributes (
    product_id   bigint REFERENCES products ON DELETE CASCADE,
    attribute_id int REFERENCES attributes ON DELETE CASCADE,
    value        text NOT NULL,
    PRIMARY KEY (product_id, attribute_id)
);
CREATE INDEX ON product_attributes (attribute_id);
CREATE TABLE prices (
    product_id bigint REFERENCES products ON DELETE CASCADE,
    currency   text NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    PRIMARY KEY (product_id, currency)
);
CREATE TABLE product_relations (
    id         bigint PRIMARY KEY,
    product_id bigint NOT NULL REFERENCES products ON DELETE CASCADE,
    related_id bigint NOT NULL REFERENCES products ON DELETE CASCADE,
    kind       text NOT NULL
);
CREATE INDEX ON product_relations (product_id);
CREATE TABLE stores (
    code  text PRIMARY KEY,
    name  text NOT NULL
);
-- Keyed by two columns: one document per (product, store).
CREATE TABLE stock (
    product_id bigint REFERENCES products ON DELETE CASCADE,
    store      text REFERENCES stores ON DELETE CASCADE,
    quantity   int NOT NULL,
    PRIMARY KEY (product_id, store)
);
CREATE INDEX ON stock (store);

INSERT INTO attributes
SELECT i, 'attr_' || i, 'Attribute ' || i, CASE WHEN i % 3 = 0 THEN 'number' ELSE 'text' END
  FROM generate_series(1, 20) i;

INSERT INTO categories
SELECT i, CASE WHEN i > 5 THEN 1 + i % 5 END, 'Category ' || i
  FROM generate_series(1, greatest(5, :products / 50)) i;

INSERT INTO products (id, sku, name, category_id, description)
SELECT i, 'SKU-' || lpad(i::text, 8, '0'), 'Product ' || i,
       1 + i % greatest(5, :products / 50),
       'A fine product, number ' || i || ', ' || repeat('with a longer description ', 1 + i % 4)
  FROM generate_series(1, :products) i;

INSERT INTO product_attributes
SELECT p, 1 + (p + k * 7) % 20, 'value ' || (p * k) % 97
  FROM generate_series(1, :products) p, generate_series(0, 2) k;

INSERT INTO prices
SELECT p, c, round((10 + (p * 37) % 990)::numeric * CASE c WHEN 'EUR' THEN 1 ELSE 1.1 END, 2)
  FROM generate_series(1, :products) p, unnest(ARRAY['EUR', 'USD']) c;

INSERT INTO product_relations
SELECT i, i, 1 + (i * 13) % :products, CASE WHEN i % 2 = 0 THEN 'related' ELSE 'upsell' END
  FROM generate_series(1, :products / 2) i;

INSERT INTO stores VALUES ('berlin', 'Berlin Mitte'), ('paris', 'Paris Nord');

INSERT INTO stock
SELECT p, s, (p * 7) % 50
  FROM generate_series(1, :products) p, unnest(ARRAY['berlin', 'paris']) s;

ANALYZE attributes, categories, products, product_attributes, prices, product_relations, stores, stock;
