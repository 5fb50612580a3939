-- cde._unseen: a rebuild leaves a feed-table row written by a transaction its snapshot does not
-- see (and queues its key again), and overwrites any other. A row's xmin is the xid it was
-- written with, kept when the row is frozen: a row untouched for 2^31 transactions or more
-- carries an xid that reads as a future one, and must count as seen, or its key would be
-- queued again for ever.
\i sql/fresh.inc
BEGIN;
SELECT txid_current() > 0 AS has_xid;
-- This transaction's own writes.
SELECT cde._unseen((txid_current() % 4294967296)::text::xid, 'own') AS own;
-- Frozen and bootstrap xids.
SELECT cde._unseen('2'::xid, 'frozen') AS frozen, cde._unseen('1'::xid, 'bootstrap') AS bootstrap;
-- An xid committed long before the snapshot.
SELECT cde._unseen('3'::xid, 'committed') AS committed_before;
-- The xid of a row frozen 2^32 - 1000 transactions ago: it reads as 1,000 ahead.
SELECT cde._unseen(((txid_current() + 1000) % 4294967296)::text::xid, 'ancient') AS ancient;
-- None of them is remembered to be queued again.
SELECT cde._unseen_keys() AS remembered;
ROLLBACK;
