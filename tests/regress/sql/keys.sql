-- A key is one key: its text form does not depend on the session that wrote the row or the one
-- that rebuilt it. Date and timestamptz keys written under another DateStyle and TimeZone are
-- queued and rebuilt as the same text, ISO and UTC.
\i sql/fresh.inc
BEGIN;
SET cde.endpoint = '';
CREATE TABLE events (day date PRIMARY KEY, at timestamptz UNIQUE, label text);
SELECT cde_register_feed('by_day', 'SELECT day, label FROM events', 'day');
SELECT cde_register_feed('by_time', 'SELECT at, label FROM events', 'at');
SELECT cde_track('by_day', 'events');
SELECT cde_track('by_time', 'events');
SET DateStyle = 'SQL, DMY';
SET TimeZone = 'Asia/Tokyo';
INSERT INTO events VALUES ('2026-12-01', '2026-12-01 09:30:00+09', 'first');
SELECT day, at FROM events;                           -- how this session shows them
SELECT feed, keys FROM cde.queue ORDER BY feed;       -- how they are queued
SELECT feed, collected FROM cde_sync_now();
RESET DateStyle;
SET TimeZone = 'America/New_York';
UPDATE events SET label = 'changed';
SELECT feed, keys FROM cde.queue ORDER BY feed;       -- the same keys
SELECT feed, collected FROM cde_sync_now();
SELECT key, doc FROM cde.feed_by_day;                 -- one key each
SELECT key, doc FROM cde.feed_by_time;
ROLLBACK;
