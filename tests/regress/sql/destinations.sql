-- Destinations: created and changed by a superuser only, each option checked, no secret taken in
-- SQL or shown in cde_destinations; a feed names one, a delegated admin only one its roles allow;
-- a destination in use is not dropped.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
-- Files the server reads (written by the server itself, as its OS user).
COPY (SELECT 'regress-bearer-key') TO '/tmp/cde_regress_key';
COPY (SELECT 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw') TO '/tmp/cde_regress_whsec';
COPY (SELECT 'not a secret') TO '/tmp/cde_regress_bad_whsec';
BEGIN;
SELECT cde_set_destination('search', 'http://127.0.0.1:9/ingest/', '{
    "api_key_file": "/tmp/cde_regress_key", "signing_secret_file": "/tmp/cde_regress_whsec",
    "max_requests_per_second": 2, "batch_size": 100, "max_batch_bytes": 65536, "timeout": "5s",
    "compression": false, "headers": {"X-Tenant": "eu-1"}}');
SELECT cde_set_destination('prices', 'https://prices.example.com', '{}');
-- What operators see: state, limits in force, whether it signs and has a key; no secret, no path.
SELECT name, CASE WHEN name = 'default' THEN '(cde.endpoint)' ELSE endpoint END AS endpoint, state, feeds,
       max_requests_per_second, batch_size, max_batch_bytes, timeout, compression, signed, bearer_key, headers
  FROM cde_destinations;
SELECT count(*) AS rows_mentioning_a_secret FROM cde_destinations d
 WHERE d::text LIKE '%regress-bearer-key%' OR d::text LIKE '%whsec%' OR d::text LIKE '%/tmp/%';

-- Bad input: each error names what is wrong, and nothing is stored.
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"batchsize": 10}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"batch_size": 0}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"max_requests_per_second": "fast"}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"timeout": "soon"}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"api_key": "s3cret"}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"api_key_file": "/tmp/cde_regress_missing"}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"signing_secret_file": "/tmp/cde_regress_bad_whsec"}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"headers": {"Authorization": "Bearer x"}}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"headers": {"X-Api-Key": "k"}}');
SELECT cde_set_destination('search', 'http://127.0.0.1:9', '{"roles": ["regress_nobody"]}');
SELECT cde_set_destination('search', 'http://user:pw@127.0.0.1:9', '{}');
SELECT cde_set_destination('search', 'ftp://127.0.0.1', '{}');
SELECT cde_set_destination('search', NULL, '{}');
SELECT cde_set_destination('default', 'http://127.0.0.1:9', '{}');
SELECT cde_set_destination('Bad Name', 'http://127.0.0.1:9', '{}');
SELECT options->>'batch_size' AS batch_size_kept FROM cde.destinations WHERE name = 'search';

-- Feeds name a destination; NULL and 'default' are cde.endpoint's.
CREATE TABLE products (id int PRIMARY KEY, name text);
SELECT cde_register_feed('products', 'SELECT id, name FROM products', destination => 'search');
SELECT cde_register_feed('plain', 'SELECT id, name FROM products', destination => 'default');
SELECT cde_register_feed('lost', 'SELECT id, name FROM products', destination => 'nowhere');
SELECT feed, destination FROM cde_feed_status ORDER BY feed;
SELECT name, feeds FROM cde_destinations;

-- In use: not dropped; the error names the feeds.
SELECT cde_drop_destination('search');
SELECT cde_drop_destination('default');
SELECT cde_drop_destination('nowhere');
SELECT cde_drop_destination('prices');
SELECT name FROM cde_destinations;

-- A delegated admin sets none, and uses only those whose roles name it (or a role it is in).
CREATE ROLE regress_dest_admin;
SELECT cde_grant_admin('regress_dest_admin');
GRANT SELECT ON products TO regress_dest_admin;
SET ROLE regress_dest_admin;
SELECT cde_set_destination('mine', 'http://127.0.0.1:9', '{}');
SELECT cde_drop_destination('search');
SELECT cde_register_feed('admins', 'SELECT id, name FROM public.products', destination => 'search');
SELECT cde_register_feed('admins', 'SELECT id, name FROM public.products');
SELECT name, state FROM cde_destinations ORDER BY name;
RESET ROLE;
CREATE ROLE regress_dest_team;
GRANT regress_dest_team TO regress_dest_admin;
SELECT cde_set_destination('search', 'http://127.0.0.1:9/ingest', '{"roles": ["regress_dest_team"]}');
SET ROLE regress_dest_admin;
SELECT cde_register_feed('admins', 'SELECT id, name FROM public.products', destination => 'search');
RESET ROLE;
SELECT feed, destination FROM cde_feed_status ORDER BY feed;
-- Taken out of the role, its feed is no longer sent there (checked at every iteration); a role
-- named in roles is the role as it was when the destination was set, not a later one of that name.
REVOKE regress_dest_team FROM regress_dest_admin;
SELECT f.name, cde._may_use_destination(f.owner, f.destination) AS may_send FROM cde.feeds f ORDER BY f.name;
GRANT regress_dest_team TO regress_dest_admin;
SELECT cde_set_destination('search', 'http://127.0.0.1:9/ingest', '{}');   -- narrowed: says whose feeds lose it
ALTER ROLE regress_dest_team RENAME TO regress_dest_team2;
SELECT cde_set_destination('search', 'http://127.0.0.1:9/ingest', '{"roles": ["regress_dest_team2"]}');
SELECT name, roles FROM cde_destinations WHERE name = 'search';
DROP OWNED BY regress_dest_team2;
DROP ROLE regress_dest_team2;
CREATE ROLE regress_dest_team2;
GRANT regress_dest_team2 TO regress_dest_admin;
SELECT f.name, cde._may_use_destination(f.owner, f.destination) AS may_send FROM cde.feeds f ORDER BY f.name;
-- Not even through the table: cde's schema is closed to it.
SET ROLE regress_dest_admin;
UPDATE cde.destinations SET endpoint = 'http://evil.example.com';
RESET ROLE;

-- A monitor reads the view, and no secret.
CREATE ROLE regress_dest_monitor IN ROLE pg_monitor;
SET ROLE regress_dest_monitor;
SELECT name, state, signed, bearer_key FROM cde_destinations;
SELECT count(*) FROM cde.destinations;
RESET ROLE;
ROLLBACK;
