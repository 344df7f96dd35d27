-- PUT /v1/conversations/{id} toggling is_muted as pgbench runs it: the service's two
-- statements (repository.py: SELECT_BY_ID, then UPDATE_CONVERSATION, the row where its version
-- is still the one read and its outbox row in one statement) on a random one of the same
-- targets. The SELECT joins bench_targets to pick row :n (pgbench cannot read ids from a file)
-- and keeps the key and version for the next statement (\gset). The UPDATE sets is_muted and
-- the version and the sync position (the service also writes the six other writable fields,
-- unchanged: the same row and tuple size). Mirrors service/conversations/repository.py by hand:
-- follow it there.
\set n random(1, :targets)
SELECT c.account_id AS acct, c.id AS cid, c.version AS ver,
       c.contact_id, c.group_id, c.pinned_message_id, c.is_pinned, c.is_muted,
       c.last_active_at, c.last_opened_at, c.created_at, c.archived_at
FROM bench_targets t
JOIN conversations c ON c.account_id = t.account_id AND c.id = t.id
WHERE t.n = :n \gset
WITH changed AS (
    UPDATE conversations
    SET is_muted = NOT is_muted, version = version + 1, change_xid = pg_current_xact_id()
    WHERE account_id = :acct AND id = :cid AND version = :ver::bigint
    RETURNING id, contact_id, group_id, pinned_message_id, is_pinned, is_muted, last_active_at,
              last_opened_at, created_at, archived_at, version),
event AS (
    INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                        traceparent)
    SELECT 'evt_' || id || '_' || version::text, 'conversation.updated', :acct, id, version,
           '{"id": "evt_0VbyNILkpXDULPE0","type": "conversation.updated","created_at": 1795596350,"account_id": "acct_00001","sequence": 2,"data": {"object": {"id": "0VbyNILkpXDULPE0","contact_id": "WAz8eIbvDR60rouK","group_id": null,"pinned_message_id": null,"is_pinned": false,"is_muted": true,"last_active_at": 1795596350,"last_opened_at": null,"created_at": 1795596350,"archived_at": null},"previous_attributes": {"is_muted": false}}}'::json,
           NULL
    FROM changed
)
SELECT id, contact_id, group_id, pinned_message_id, is_pinned, is_muted, last_active_at,
       last_opened_at, created_at, archived_at, version
FROM changed;
