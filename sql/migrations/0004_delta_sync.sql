-- Delta sync (GET /v1/conversations/changes): where each conversation's last change sits in an
-- order that a late commit cannot overtake, and what was deleted.
--
-- The position is the id of the transaction that made the change (xid8: 64 bits, never wraps).
-- A reader reads a snapshot's xmin with it: every transaction below xmin has ended, so nothing
-- can still commit below it (docs/architecture.md, "Delta sync"). Existing rows get the
-- migration's own transaction id: a stable default, so no table rewrite.
ALTER TABLE conversations ADD COLUMN change_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

-- The sync walk: an index range scan of one account in (position, id) order.
CREATE INDEX conversations_account_change_idx ON conversations (account_id, change_xid, id);

-- One row per deleted conversation, written by the delete's own statement, kept for
-- SYNC_RETENTION_DAYS and then removed in bounded batches.
CREATE TABLE conversation_tombstones (
    account_id text NOT NULL,
    id         text COLLATE "C" NOT NULL,
    position   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, position, id)
);
-- What the removal of expired tombstones scans, oldest first.
CREATE INDEX conversation_tombstones_deleted_at_idx ON conversation_tombstones (deleted_at);

-- How far tombstones have been removed: the highest position removed so far. A token that has
-- not reached past it may have missed a deletion, so it is refused (410) and the client starts
-- again. One row.
CREATE TABLE conversation_tombstones_removed (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    through_position xid8 NOT NULL
);
INSERT INTO conversation_tombstones_removed (through_position) VALUES ('0');
