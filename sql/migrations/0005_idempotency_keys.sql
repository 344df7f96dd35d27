-- Idempotency keys: the answer of a keyed write, committed in the same transaction as the write.
-- A row exists only once that transaction commits, so every row is a completed request; a
-- request still running is a transaction-scoped advisory lock on (account, key), which ends with
-- its transaction (commit, rollback or the session's death), so a crash never leaves a key stuck.
CREATE TABLE idempotency_keys (
    account_id  text        NOT NULL,
    key         text        COLLATE "C" NOT NULL,
    -- SHA-256 of the request: method, path with query, If-Match, the body as parsed.
    fingerprint bytea       NOT NULL,
    -- The stored answer, replayed byte for byte: status, body, and its ETag/Location headers.
    status      smallint    NOT NULL,
    body        bytea       NOT NULL,
    headers     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- Keys are per account: another account may use the same key freely.
    PRIMARY KEY (account_id, key),
    CONSTRAINT idempotency_keys_key_format CHECK (key ~ '^[\x20-\x7e]{1,255}$'),
    CONSTRAINT idempotency_keys_fingerprint_length CHECK (octet_length(fingerprint) = 32),
    CONSTRAINT idempotency_keys_status_range CHECK (status BETWEEN 200 AND 599)
);

-- What the housekeeping job scans: the oldest expired keys first, in bounded batches.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
