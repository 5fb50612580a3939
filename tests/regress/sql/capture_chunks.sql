-- A statement's keys go in rows of at most cde._chunk_size() keys, whichever trigger queues them: collecting a bulk write then takes a bounded slice at a time.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT cde._chunk_size();
INSERT INTO products SELECT g, 'bulk', 1 FROM generate_series(100, 12099) AS g;    -- cde._capture
UPDATE categories SET name = 'Clogs' WHERE id = 1;    -- cde._capture_keys: its 12,002 products, once each
SELECT feed, cardinality(keys) FROM cde.queue ORDER BY id;
ROLLBACK;
