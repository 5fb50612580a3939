-- cde's own tables, and nothing else (functions and types are in the other files): an upgrade
-- script changes these in place and recreates everything else (docs/contributing.md). Everything
-- internal lives in schema "cde", which PUBLIC cannot use: the
-- application roles that write tracked tables reach it only through the SECURITY DEFINER capture
-- triggers. The public API (cde_* functions and views) lives in the extension's schema.

CREATE SCHEMA cde;
REVOKE ALL ON SCHEMA cde FROM PUBLIC;
COMMENT ON SCHEMA cde IS 'cde internals: feed definitions, the change queue, feed tables, retries, sync runs';

-- Where feeds are sent (cde_set_destination), and their state. `default` is the server's own:
-- cde.endpoint and its key. A destination-level failure (a wrong key or URL, a TLS or DNS
-- failure: docs/protocol.md, "Responses") is the destination's, not its items': while held_until
-- is ahead, nothing is sent to it but one request per cde.retry_interval to see whether it was
-- fixed; a reload of the settings releases it at once. 410 Gone disables it (disabled_at) until
-- cde_set_destination (a reload for default). Secrets are never here: options name files.
CREATE TABLE cde.destinations (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,47}$'),
    held_until   timestamptz,
    held_status  int,                      -- the HTTP status that held it (NULL: TLS, DNS)
    held_error   text,                     -- e.g. 'unauthorized (HTTP 401): ...'
    held_since   timestamptz,
    endpoint     text,                     -- NULL for default (cde.endpoint)
    options      jsonb NOT NULL DEFAULT '{}',   -- checked by cde._check_destination_options
    roles        regrole[] NOT NULL DEFAULT '{}',   -- options' roles, resolved when set
    disabled_at  timestamptz,              -- 410 Gone
    disabled_error text,
    last_status  int,                      -- of the last response
    last_error   text,
    last_error_at timestamptz,
    failing_since timestamptz,             -- requests fail (or a secret file cannot be read) since
    last_success_at timestamptz,
    requests     bigint NOT NULL DEFAULT 0,
    requests_failed bigint NOT NULL DEFAULT 0,
    items_sent   bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cde.destinations (name) VALUES ('default');
COMMENT ON TABLE cde.destinations IS 'Where feeds are sent (cde_set_destination), and whether a failure holds or a 410 disabled them';

-- One row per feed: its source query and everything generated from it at registration.
CREATE TABLE cde.feeds (
    name          text PRIMARY KEY,
    source_query  text NOT NULL,
    doc_column    boolean NOT NULL,        -- the query has a json/jsonb column "doc"
    mode          text NOT NULL CHECK (mode IN ('immediate', 'legacy')),
    depends_on    text[] NOT NULL DEFAULT '{}',
    batch_size    int CHECK (batch_size > 0),
    owner         regrole NOT NULL,        -- the source query runs with this role's rights (src/trust.rs)
    search_path   text NOT NULL,           -- the registering session's, fixed for the source query
    feed_table    regclass NOT NULL,       -- cde.feed_<name>
    hold_until    timestamptz,             -- Retry-After from the endpoint holds the whole feed back
    last_legacy_send_at timestamptz,
    last_sent_at  timestamptz,
    last_error    text,
    last_error_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    destination   text REFERENCES cde.destinations,  -- NULL: default (cde.endpoint)
    -- What came of its items, ever (counters for monitoring: docs/monitoring.md), kept by
    -- cde._record and cde._build_failed.
    items_sent     bigint NOT NULL DEFAULT 0,
    items_rejected bigint NOT NULL DEFAULT 0,
    items_retried  bigint NOT NULL DEFAULT 0,  -- sends that failed, to be tried again
    items_dead     bigint NOT NULL DEFAULT 0,
    build_failures bigint NOT NULL DEFAULT 0,
    -- The columns of the source query that make an entity's key, and their own types (rebuilds
    -- filter in them). Several: a composite key (cde._key_sql).
    key_columns   text[] NOT NULL CHECK (cardinality(key_columns) >= 1),
    key_types     regtype[] NOT NULL CHECK (cardinality(key_types) = cardinality(key_columns))
);
COMMENT ON TABLE cde.feeds IS 'Registered feeds (cde_register_feed)';

-- The rows of each feed table by status and deleted flag, so that the views never count a feed
-- table (docs/monitoring.md): statement triggers on the feed table (cde._count_rows) append each
-- writing statement's net change in its own transaction, and the worker folds them into one row
-- per feed, status and flag (cde._housekeep). Exact: their sum is the count, in any snapshot.
-- A row with status '*' (n = 0) says a feed's counts are kept: cde._recount, which sets them to
-- what the table holds, adds it; a feed without it (a restored copy) is counted once.
CREATE TABLE cde.row_counts (
    feed    text NOT NULL,
    status  text NOT NULL,
    deleted boolean NOT NULL,
    n       bigint NOT NULL
);
COMMENT ON TABLE cde.row_counts IS 'Rows of each feed table by status and deleted flag (sum of n), kept by triggers';

-- Which tables a feed tracks, and how a change there maps to the feed's keys.
CREATE TABLE cde.tracks (
    feed          text NOT NULL REFERENCES cde.feeds ON DELETE CASCADE,
    source_table  regclass NOT NULL,       -- a name in a dump, so that a restored copy tracks its own tables
    table_name    text NOT NULL,
    keys          text,                    -- NULL, an expression over the changed row, or a SELECT over "changed"
    PRIMARY KEY (feed, source_table),
    replicated    boolean NOT NULL DEFAULT false   -- writes applied by logical replication are captured too
);
COMMENT ON TABLE cde.tracks IS 'Tracked tables (cde_track); cde._install_capture turns a table''s tracks into its capture triggers';

-- The change queue: one row per feed per writing statement, holding the keys it touched (a
-- statement that touched more than cde._chunk_size() keys takes several rows: see cde._enqueue).
-- One row per statement (not per changed row) keeps bulk writes cheap; the collector
-- deduplicates. all_keys marks a TRUNCATE: every key of the feed must be rebuilt.
CREATE TABLE cde.queue (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    feed       text COLLATE "C" NOT NULL,  -- "C": every captured write descends its index
    keys       text[],
    all_keys   boolean NOT NULL DEFAULT false,
    queued_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_feed_id ON cde.queue (feed, id);
COMMENT ON TABLE cde.queue IS 'Keys changed by committed writes, waiting to be collected into feed tables';

-- The retry table: items whose delivery failed and when they are due again.
CREATE TABLE cde.retries (
    feed            text NOT NULL REFERENCES cde.feeds ON DELETE CASCADE,
    key             text NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    reason          text NOT NULL CHECK (reason IN ('send', 'build')),
    PRIMARY KEY (feed, key)
);
CREATE INDEX retries_due ON cde.retries (feed, next_attempt_at);
COMMENT ON TABLE cde.retries IS 'Failed items and when the worker revisits them (cde.retry_interval)';

-- Full sync runs (cde_full_sync) and their per-feed phases.
CREATE TABLE cde.sync_runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    feeds        text[] NOT NULL,
    dry_run      boolean NOT NULL DEFAULT false,
    status       text NOT NULL DEFAULT 'preparing'
                 CHECK (status IN ('preparing', 'planned', 'executing', 'finished', 'failed', 'cancelled')),
    current_phase text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    error        text
);

CREATE TABLE cde.sync_phases (
    run_id     bigint NOT NULL REFERENCES cde.sync_runs ON DELETE CASCADE,
    feed       text NOT NULL,
    ordinal    int NOT NULL,                -- phase order, from the feeds' dependencies
    status     text NOT NULL DEFAULT 'waiting'
               CHECK (status IN ('waiting', 'building', 'sending', 'finished', 'failed', 'cancelled')),
    deletions_cursor text,                  -- last feed-table key checked for deletion
    -- false when the feed table had no live row as the phase started (a feed's first sync):
    -- every row in it then was built or collected during the phase, none can be stale, and the
    -- deletion pass is skipped (a tenth of a first sync's time)
    check_deletions boolean NOT NULL DEFAULT true,
    planned    bigint NOT NULL DEFAULT 0,
    processed  bigint NOT NULL DEFAULT 0,
    sent       bigint NOT NULL DEFAULT 0,
    unchanged  bigint NOT NULL DEFAULT 0,
    deleted    bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    started_at timestamptz,
    finished_at timestamptz,
    built_at   timestamptz,                 -- every document built: the phase then waits for their delivery
    PRIMARY KEY (run_id, feed)
);

CREATE TABLE cde.sync_events (
    run_id  bigint NOT NULL REFERENCES cde.sync_runs ON DELETE CASCADE,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    status  text NOT NULL,
    feed    text,
    message text
);
CREATE INDEX ON cde.sync_events (run_id, at);
COMMENT ON TABLE cde.sync_events IS 'History of each full sync run: every status and phase change';

-- A phase's building, split into lanes by a hash of the key (cde._lane), so that several sync
-- builders (cde.sync_builders) build one phase at once: a step takes a lane no other step holds
-- and builds that lane's next chunk after its cursor. Each lane is a resume point of its own.
CREATE TABLE cde.sync_lanes (
    run_id     bigint NOT NULL,
    feed       text NOT NULL,
    lane       int NOT NULL,                -- 0 .. lanes - 1
    lanes      int NOT NULL,                -- how many the phase was split into
    cursor_key text,                        -- last source key built in this lane, in text form
    done       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, feed, lane),
    FOREIGN KEY (run_id, feed) REFERENCES cde.sync_phases ON DELETE CASCADE
);

-- What a sync builder wrote as sent and is posting now, after its chunk committed
-- (src/builder_send.rs): the worker sends no newer version of these keys until the builder is
-- done and deletes the row. A builder that stopped first (no backend of that pid and start is
-- left) leaves it, and the keys go again (cde._recover_posts).
CREATE TABLE cde.sync_posts (
    id            bigserial PRIMARY KEY,
    feed          text NOT NULL,
    keys          text[] NOT NULL,
    pid           int NOT NULL,
    backend_start timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- A dump of the database keeps cde's configuration and state with it (feed tables, which are
-- not members of the extension, are dumped as ordinary tables): docs/operations.md, "Dump and
-- restore". The default destination's row is the extension's own.
SELECT pg_catalog.pg_extension_config_dump('cde.feeds', '');
SELECT pg_catalog.pg_extension_config_dump('cde.tracks', '');
SELECT pg_catalog.pg_extension_config_dump('cde.queue', '');
SELECT pg_catalog.pg_extension_config_dump('cde.queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cde.retries', '');
SELECT pg_catalog.pg_extension_config_dump('cde.destinations', $$WHERE name <> 'default'$$);
SELECT pg_catalog.pg_extension_config_dump('cde.sync_runs', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_phases', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_lanes', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_events', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_posts', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_posts_id_seq', '');
-- cde.row_counts is not dumped: a restored copy counts its feed tables once their triggers are
-- there (cde._housekeep), which a dump's rows could not (the worker may write them before).
