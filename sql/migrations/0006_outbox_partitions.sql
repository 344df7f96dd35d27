-- Outbox partitions: relays share the outbox by partition (docs/architecture.md, "Partitioned
-- relays"). A partition is a stable hash of conversation_id modulo P, so one conversation's
-- events always share one partition and one relay publishes them, in order.

-- P, in one row. Change it only with outbox_set_partitions() (below), never by UPDATE.
CREATE TABLE outbox_settings (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024)
);
INSERT INTO outbox_settings (partitions) VALUES (16);

-- hashtextextended is PostgreSQL's own stable text hash (the one hash partitioning uses); the
-- double modulo keeps the result in [0, P) for negative hashes.
CREATE FUNCTION outbox_partition(conversation_id text, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ((hashtextextended(conversation_id, 0) % partitions + partitions) % partitions)::integer
$$;

-- Rows published before this migration keep 0: only pending rows are ever read by partition.
ALTER TABLE outbox ADD COLUMN partition integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ALTER COLUMN partition DROP DEFAULT;
UPDATE outbox SET partition = outbox_partition(conversation_id, 16) WHERE published_at IS NULL;

-- What a relay holding some of the partitions scans: each partition's pending rows in order.
-- (A relay holding all of them scans outbox_pending_idx, as before partitions.)
CREATE INDEX outbox_pending_partition_idx ON outbox (partition, id) WHERE published_at IS NULL;

-- Set on every insert, whatever the statement says: the write statements need not know P.
CREATE FUNCTION outbox_assign_partition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.partition := outbox_partition(
        NEW.conversation_id, (SELECT partitions FROM outbox_settings)
    );
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_assign_partition
    BEFORE INSERT ON outbox
    FOR EACH ROW
    EXECUTE FUNCTION outbox_assign_partition();

-- Changing P moves conversations to other partitions, and so possibly to another relay: while
-- an event is pending, its conversation's next event could then be published before it. So
-- the change is refused unless the outbox has nothing pending. The EXCLUSIVE lock holds every
-- writer (and relay) until the commit, so nothing is written under the old P after the check.
-- Procedure (docs/operations.md): stop the writes, let the relays drain, then run a migration
-- that calls `SELECT outbox_set_partitions(n)`.
CREATE FUNCTION outbox_set_partitions(wanted integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    pending bigint;
BEGIN
    LOCK TABLE outbox IN EXCLUSIVE MODE;
    SELECT count(*) INTO pending FROM outbox WHERE published_at IS NULL;
    IF pending > 0 THEN
        RAISE EXCEPTION 'outbox partitions not changed: % events are pending', pending
            USING HINT = 'Stop the writes, wait until the relays have published every event, retry.';
    END IF;
    UPDATE outbox_settings SET partitions = wanted;
END
$$;
