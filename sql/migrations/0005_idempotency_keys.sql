-- Idempotency keys: the answer of a keyed write, inserted by the write's own statement, so the
-- write, its event and its answer commit together or not at all. Every row is a completed
-- request: a request still running holds a transaction-scoped advisory lock on (account, key)
-- instead, which ends with its transaction (commit, rollback, or the session's death), so a
-- crash never leaves a key stuck.
CREATE TABLE idempotency_keys (
    account_id  text        NOT NULL,
    key         text        COLLATE "C" NOT NULL,
    -- SHA-256 of the request: method, path with query, If-Match, the body as parsed.
    fingerprint bytea       NOT NULL,
    -- The stored answer, replayed as it was: status, body bytes, ETag and Location.
    status      smallint    NOT NULL,
    body        bytea       NOT NULL,
    etag        text,
    location    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- Keys are per account: another account may use the same key freely.
    PRIMARY KEY (account_id, key),
    CONSTRAINT idempotency_keys_key_format CHECK (key ~ '^[\x20-\x7e]{1,255}$'),
    CONSTRAINT idempotency_keys_fingerprint_length CHECK (octet_length(fingerprint) = 32),
    CONSTRAINT idempotency_keys_status_range CHECK (status BETWEEN 200 AND 599)
);

-- What housekeeping scans for expired keys. Rows arrive in expiry order (one TTL for all), so
-- a BRIN index finds the old ones at almost no cost to each keyed write, unlike a B-tree.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys USING brin (expires_at);
