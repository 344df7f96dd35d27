-- The inbox: metadata, the activity order, and the indexes that keep its pages and filters
-- cheap at a million conversations in one account (docs/architecture.md, "Inbox").

-- Labels of the caller's own: a JSON object of strings (limits are checked by the service).
-- A constant default: no table rewrite.
ALTER TABLE conversations
    ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT conversations_metadata_object CHECK (jsonb_typeof(metadata) = 'object');

-- sort=-last_active_at: never-active conversations (null) map to -1, below every real time
-- (the CHECK keeps times >= 0), so they come last and a keyset condition on
-- (COALESCE(last_active_at, -1), id) is one index range in either direction, across the null
-- group too. A NULLS LAST column would need an OR for "after t, or null", which is a filter.
CREATE INDEX IF NOT EXISTS conversations_activity_idx
    ON conversations (account_id, (COALESCE(last_active_at, -1)) DESC, id DESC);

-- unread=true in each order: partial indexes hold only the unread conversations (usually few),
-- so a page of them never walks past the read ones. The predicate is the service's filter,
-- word for word, so that the planner can prove the query implies it.
CREATE INDEX IF NOT EXISTS conversations_unread_activity_idx
    ON conversations (account_id, (COALESCE(last_active_at, -1)) DESC, id DESC)
    WHERE last_active_at > COALESCE(last_opened_at, -1);
CREATE INDEX IF NOT EXISTS conversations_unread_id_idx
    ON conversations (account_id, id DESC)
    WHERE last_active_at > COALESCE(last_opened_at, -1);

-- metadata[key]=value: containment (@>) of the filters' object. btree_gin puts the account in
-- the same GIN index, so the account's entries and the key's are intersected in the index: a key
-- common in other accounts costs nothing here.
CREATE EXTENSION IF NOT EXISTS btree_gin;
CREATE INDEX IF NOT EXISTS conversations_metadata_idx
    ON conversations USING gin (account_id, metadata jsonb_path_ops);
