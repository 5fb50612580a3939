-- What a 0.1.0 delegated admin could do, and 0.2.0 must not carry over: a trigger of its own on
-- its feed table (it owned it), the feed's owner rewritten to a superuser (it had UPDATE on
-- cde.feeds). Run on the 0.1.0 database only; after the update it must equal the fresh one.
\set ON_ERROR_STOP on
CREATE SCHEMA tamper AUTHORIZATION cde_upgrade_admin;
SET ROLE cde_upgrade_admin;
CREATE FUNCTION tamper.on_write() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
CREATE TRIGGER tamper AFTER INSERT OR UPDATE ON cde.feed_up_notes FOR EACH ROW EXECUTE FUNCTION tamper.on_write();
UPDATE cde.feeds SET owner = 'postgres' WHERE name = 'up_notes';
RESET ROLE;
