-- Destinations: where feeds are sent, with which credentials and within which limits
-- (docs/operations.md, "Destinations"). A superuser's to set: the workers are superusers, and a
-- destination says which files the server reads (its key, its signing secret) and where the
-- feeds' documents go. Delegated admins use the ones whose `roles` option names them.

-- May a feed of this owner send to this destination? The default one (NULL): yes, as in 0.1.0.
-- Another: a superuser's feed, or one whose owner is a member of a role of its `roles` (resolved
-- to role OIDs when the destination is set: a role dropped and created again under the same name
-- is not the one named). The one rule for registration and for every iteration of the worker.
CREATE FUNCTION cde._may_use_destination(owner regrole, destination text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT destination IS NULL
        OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = owner), false)
        OR EXISTS (SELECT 1 FROM cde.destinations d, unnest(d.roles) AS u(role)
                    WHERE d.name = destination
                      AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = u.role)
                      AND pg_catalog.pg_has_role(owner::oid, u.role::oid, 'USAGE'))
$$;

-- A destination the caller's feeds may use, or an error that says why not. NULL and 'default'
-- are cde.endpoint's.
CREATE FUNCTION cde._usable_destination(destination text, caller regrole) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF destination IS NULL OR destination = 'default' THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cde.destinations x WHERE x.name = destination) THEN
        RAISE EXCEPTION 'cde: unknown destination %', quote_literal(destination)
            USING ERRCODE = 'undefined_object',
                  HINT = 'A superuser creates it with cde_set_destination(name, endpoint, options); SELECT name FROM cde_destinations lists them.';
    END IF;
    IF NOT cde._may_use_destination(caller, destination) THEN
        RAISE EXCEPTION 'cde: permission denied for destination %', destination
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('A superuser lets role %s use it: cde_set_destination(%L, endpoint, options || ''{"roles": ["%s"]}'').',
                                caller, destination, caller);
    END IF;
END $$;

-- Only a superuser: checked here too, should the function ever be granted to another role.
CREATE FUNCTION cde._require_superuser(what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), false) THEN
        RAISE EXCEPTION 'cde: only a superuser may %', what
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A destination names files the server reads and where documents go: the workers, superusers, act on it.';
    END IF;
END $$;

CREATE FUNCTION cde_set_destination(destination text, endpoint text, options jsonb DEFAULT '{}') RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r text;
    roles regrole[] := '{}';
    losing text;
BEGIN
    PERFORM cde._require_superuser('set a destination');
    IF destination = 'default' THEN
        RAISE EXCEPTION 'cde: destination default is the server''s: cde.endpoint and cde.api_key_file'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'ALTER SYSTEM SET cde.endpoint = ...; SELECT pg_reload_conf(); or give this destination another name.';
    END IF;
    IF destination IS NULL OR destination !~ '^[a-z][a-z0-9_]{0,47}$' THEN
        RAISE EXCEPTION 'cde: invalid destination name %', coalesce(quote_literal(destination), 'NULL')
            USING ERRCODE = 'invalid_name',
                  HINT = 'A destination name is a plain lower-case identifier: a letter, then letters, digits or _, at most 48 characters.';
    END IF;
    PERFORM cde._check_endpoint(endpoint);
    PERFORM cde._check_destination_options(coalesce(options, '{}'));
    FOREACH r IN ARRAY cde._destination_roles(coalesce(options, '{}')) LOOP
        IF to_regrole(quote_ident(r)) IS NULL THEN   -- the name as written, not case-folded
            RAISE EXCEPTION 'cde: option roles of destination %: role % does not exist', destination, quote_ident(r)
                USING ERRCODE = 'undefined_object';
        END IF;
        roles := roles || to_regrole(quote_ident(r));
    END LOOP;
    -- Set again, it is released from a hold or a 410, and every secret file is read again.
    INSERT INTO cde.destinations AS d (name, endpoint, options, roles)
    VALUES (destination, rtrim(endpoint, '/'), coalesce(options, '{}'), roles)
    ON CONFLICT (name) DO UPDATE
       SET endpoint = excluded.endpoint, options = excluded.options, roles = excluded.roles, updated_at = clock_timestamp(),
           held_until = NULL, held_status = NULL, held_error = NULL, held_since = NULL,
           disabled_at = NULL, disabled_error = NULL, failing_since = NULL;
    SELECT string_agg(f.name, ', ' ORDER BY f.name) INTO losing
      FROM cde.feeds f WHERE f.destination = cde_set_destination.destination AND NOT cde._may_use_destination(f.owner, f.destination);
    IF losing IS NOT NULL THEN
        RAISE WARNING 'cde: feeds % may no longer use destination %: their owners are in none of its roles; they are not sent until that changes', losing, destination;
    END IF;
    PERFORM cde._changes_recorded();   -- the worker looks at once
END $$;

REVOKE ALL ON FUNCTION cde_set_destination(text, text, jsonb) FROM PUBLIC;
COMMENT ON FUNCTION cde_set_destination(text, text, jsonb) IS
    'Create or update a destination: its endpoint and options (key and signing secret files, limits, headers)';

CREATE FUNCTION cde_drop_destination(destination text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    users text;
BEGIN
    PERFORM cde._require_superuser('drop a destination');
    IF destination = 'default' THEN
        RAISE EXCEPTION 'cde: destination default is the server''s and cannot be dropped'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Empty cde.endpoint to send nothing.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM cde.destinations d WHERE d.name = destination) THEN
        RAISE EXCEPTION 'cde: unknown destination %', coalesce(quote_literal(destination), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
    SELECT string_agg(f.name, ', ' ORDER BY f.name) INTO users FROM cde.feeds f WHERE f.destination = cde_drop_destination.destination;
    IF users IS NOT NULL THEN
        RAISE EXCEPTION 'cde: destination % is used by feeds %', destination, users
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Register those feeds with another destination (cde_register_feed(..., destination => ...)) or drop them first.';
    END IF;
    DELETE FROM cde.destinations d WHERE d.name = destination;
END $$;

REVOKE ALL ON FUNCTION cde_drop_destination(text) FROM PUBLIC;
COMMENT ON FUNCTION cde_drop_destination(text) IS 'Drop a destination no feed uses';

-- The worker's bookkeeping (src/worker.rs, src/deliver.rs).

-- A posted slice's requests, and whether the destination answered (2xx, or a 4xx about items).
CREATE FUNCTION cde._destination_answered(p_name text, p_requests bigint, p_failed bigint, p_status int, p_error text, p_ok boolean)
RETURNS void LANGUAGE sql AS $$
    UPDATE cde.destinations SET
        requests        = requests + p_requests,
        requests_failed = requests_failed + p_failed,
        last_status     = coalesce(p_status, last_status),
        last_error      = CASE WHEN p_ok THEN last_error ELSE coalesce(p_error, last_error) END,
        last_error_at   = CASE WHEN p_ok OR p_error IS NULL THEN last_error_at ELSE now() END,
        last_success_at = CASE WHEN p_ok THEN now() ELSE last_success_at END,
        failing_since   = CASE WHEN p_ok THEN NULL ELSE coalesce(failing_since, now()) END
     WHERE name = p_name AND p_requests > 0
$$;

-- A secret file could not be read: nothing is sent to it (state failing) until it can.
CREATE FUNCTION cde._destination_problem(p_name text, p_error text) RETURNS void
LANGUAGE sql AS $$
    UPDATE cde.destinations SET last_error = p_error, last_error_at = now(), failing_since = coalesce(failing_since, now())
     WHERE name = p_name
$$;

-- A destination answered as misconfigured: hold it (the worker sends nothing to it until then,
-- but one request to see whether it was fixed). Returns whether it was not held for this reason
-- already, so that the worker logs a hold once.
CREATE FUNCTION cde._hold_destination(p_name text, p_status int, p_error text, p_for interval) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    fresh boolean;
BEGIN
    SELECT held_until IS NULL OR held_status IS DISTINCT FROM p_status
           OR split_part(held_error, ':', 1) IS DISTINCT FROM split_part(p_error, ':', 1)
      INTO fresh FROM cde.destinations WHERE name = p_name;
    UPDATE cde.destinations
       SET held_until = now() + p_for, held_status = p_status, held_error = p_error,
           held_since = CASE WHEN fresh THEN now() ELSE held_since END
     WHERE name = p_name;
    RETURN coalesce(fresh, true);
END $$;

-- 410 Gone: disabled until cde_set_destination (default: until a reload). Returns whether it was
-- not disabled already.
CREATE FUNCTION cde._disable_destination(p_name text, p_error text) RETURNS boolean
LANGUAGE sql AS $$
    WITH d AS (
        UPDATE cde.destinations SET disabled_at = now(), disabled_error = p_error, last_status = 410,
                                    last_error = p_error, last_error_at = now()
         WHERE name = p_name AND disabled_at IS NULL
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM d)
$$;

-- The destination took a request again. Returns whether it was held.
CREATE FUNCTION cde._release_destination(p_name text) RETURNS boolean
LANGUAGE sql AS $$
    WITH r AS (
        UPDATE cde.destinations SET held_until = NULL, held_status = NULL, held_error = NULL, held_since = NULL
         WHERE name = p_name AND held_until IS NOT NULL
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM r)
$$;

-- The settings were reloaded: every hold is released (a key file may have been replaced), and
-- the default destination, which cde_set_destination does not set, is enabled again.
CREATE FUNCTION cde._release_destinations() RETURNS void
LANGUAGE sql AS $$
    UPDATE cde.destinations SET held_until = NULL, held_status = NULL, held_error = NULL, held_since = NULL
     WHERE held_until IS NOT NULL;
    UPDATE cde.destinations SET disabled_at = NULL, disabled_error = NULL, failing_since = NULL
     WHERE name = 'default' AND disabled_at IS NOT NULL;
$$;
