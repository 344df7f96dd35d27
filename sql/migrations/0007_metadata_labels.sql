-- metadata[key]=value filters as one index range in either order (docs/architecture.md,
-- "metadata filters"). The GIN index of 0003 finds a value's rows but cannot give them in the
-- list's order: a page filtered on a value held by 1% of the account walked the order's index
-- and read about 100 rows for each one it showed. Here each key=value pair of a conversation is
-- a row, beside the conversation's keys in both orders, so a filtered page reads only rows
-- that have the value, already in order.
CREATE TABLE conversation_labels (
    account_id text NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      text COLLATE "C" NOT NULL,
    -- COALESCE(last_active_at, -1): the activity order's key (0003's conversations_activity_idx).
    activity   bigint NOT NULL,
    id         text COLLATE "C" NOT NULL,
    -- Also the -created_at order's index: (account, key, value, id DESC) is a backward scan.
    -- At most 40 + 500 characters of key and value (the contract's limits) fit a B-tree entry.
    PRIMARY KEY (account_id, key, value, id)
);
CREATE INDEX conversation_labels_activity_idx
    ON conversation_labels (account_id, key, value, activity DESC, id DESC);

-- Kept by the conversations' own writes, in their transaction, whatever the statement: a row
-- without metadata never calls the function (the triggers' WHEN), and an update calls it only
-- when the metadata or the activity key changed.
CREATE FUNCTION conversation_labels_sync() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM conversation_labels AS l
        USING jsonb_each_text(OLD.metadata) AS pair
        WHERE l.account_id = OLD.account_id AND l.key = pair.key AND l.value = pair.value
          AND l.id = OLD.id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO conversation_labels (account_id, key, value, activity, id)
        SELECT NEW.account_id, pair.key, pair.value, COALESCE(NEW.last_active_at, -1), NEW.id
        FROM jsonb_each_text(NEW.metadata) AS pair;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER conversation_labels_insert
    AFTER INSERT ON conversations
    FOR EACH ROW WHEN (NEW.metadata <> '{}')
    EXECUTE FUNCTION conversation_labels_sync();
CREATE TRIGGER conversation_labels_update
    AFTER UPDATE OF metadata, last_active_at ON conversations
    FOR EACH ROW WHEN (
        (OLD.metadata <> '{}' OR NEW.metadata <> '{}')
        AND (OLD.metadata IS DISTINCT FROM NEW.metadata
             OR OLD.last_active_at IS DISTINCT FROM NEW.last_active_at)
    )
    EXECUTE FUNCTION conversation_labels_sync();
CREATE TRIGGER conversation_labels_delete
    AFTER DELETE ON conversations
    FOR EACH ROW WHEN (OLD.metadata <> '{}')
    EXECUTE FUNCTION conversation_labels_sync();

-- The labels of the conversations written before this migration.
INSERT INTO conversation_labels (account_id, key, value, activity, id)
SELECT c.account_id, m.key, m.value, COALESCE(c.last_active_at, -1), c.id
FROM conversations AS c, jsonb_each_text(c.metadata) AS m
WHERE c.metadata <> '{}';

-- The GIN index is no longer read by any query, and every metadata change paid for it.
DROP INDEX IF EXISTS conversations_metadata_idx;
