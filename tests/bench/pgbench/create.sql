-- POST /v1/conversations as pgbench runs it: the service's statement (repository.py,
-- INSERT_CONVERSATION: the row and its outbox row in one statement, no BEGIN/COMMIT) for a
-- new contact in a random account. The id is 'P' and 15 hex digits of a random 60-bit number
-- (valid for the id CHECK), the contact id derives from the same number; the envelope is a
-- constant of the service's size (about 600 bytes; a space after each colon, or pgbench would
-- read `:name` in it as a variable). Mirrors service/conversations/repository.py by hand: follow it there.
\set a random(1, :accounts)
\set u random(1, 1152921504606846975)
WITH changed AS (
    INSERT INTO conversations (account_id, id, contact_id, group_id, pinned_message_id,
                               is_pinned, is_muted, last_active_at, last_opened_at, created_at)
    VALUES ('acct_' || lpad(:a::text, 5, '0'), 'P' || lpad(to_hex(:u::bigint), 15, '0'),
            'pgb_' || :u::text, NULL, NULL, false, false, NULL, NULL,
            extract(epoch FROM now())::bigint)
    ON CONFLICT DO NOTHING
    RETURNING id, contact_id, group_id, pinned_message_id, is_pinned, is_muted, last_active_at,
              last_opened_at, created_at, archived_at, version),
event AS (
    INSERT INTO outbox (event_id, event_type, account_id, conversation_id, sequence, payload,
                        traceparent)
    SELECT 'evt_' || id, 'conversation.created', 'acct_' || lpad(:a::text, 5, '0'), id, 1,
           '{"id": "evt_0VbyNILkpXDULPE0","type": "conversation.created","created_at": 1795596350,"account_id": "acct_00001","sequence": 1,"data": {"object": {"id": "0VbyNILkpXDULPE0","contact_id": "WAz8eIbvDR60rouK","group_id": null,"pinned_message_id": null,"is_pinned": false,"is_muted": false,"last_active_at": null,"last_opened_at": null,"created_at": 1795596350,"archived_at": null}}}'::json,
           NULL
    FROM changed
)
SELECT id, contact_id, group_id, pinned_message_id, is_pinned, is_muted, last_active_at,
       last_opened_at, created_at, archived_at, version
FROM changed;
