-- Conversations: one row per conversation, owned by exactly one account.
-- Timestamps are Unix seconds (bigint), as the API speaks them; no conversion on the hot path.
CREATE TABLE conversations (
    account_id        text   NOT NULL,
    -- Time-ordered ids compared bytewise ("C"), so id order is creation order.
    id                text   COLLATE "C" NOT NULL,
    contact_id        text,
    group_id          text,
    pinned_message_id text,
    is_pinned         boolean NOT NULL DEFAULT false,
    is_muted          boolean NOT NULL DEFAULT false,
    last_active_at    bigint,
    last_opened_at    bigint,
    created_at        bigint NOT NULL,
    archived_at       bigint,
    -- Bumped by every change that changes something: the ETag and the events' sequence.
    version           bigint NOT NULL DEFAULT 1,
    -- The primary key is also the list index: (account, id DESC) is a backward scan of it.
    PRIMARY KEY (account_id, id),
    CONSTRAINT conversations_id_format CHECK (id ~ '^[0-9A-Za-z]{16}$'),
    CONSTRAINT conversations_one_participant CHECK (num_nonnulls(contact_id, group_id) = 1),
    CONSTRAINT conversations_timestamps_range CHECK (
        created_at BETWEEN 0 AND 253402300799
        AND (last_active_at IS NULL OR last_active_at BETWEEN 0 AND 253402300799)
        AND (last_opened_at IS NULL OR last_opened_at BETWEEN 0 AND 253402300799)
        AND (archived_at IS NULL OR archived_at BETWEEN 0 AND 253402300799)
    ),
    CONSTRAINT conversations_version_positive CHECK (version > 0)
);

-- A contact or a group has at most one conversation per account.
CREATE UNIQUE INDEX conversations_account_contact_key
    ON conversations (account_id, contact_id) WHERE contact_id IS NOT NULL;
CREATE UNIQUE INDEX conversations_account_group_key
    ON conversations (account_id, group_id) WHERE group_id IS NOT NULL;

-- Transactional outbox: every committed change writes its event here, in the same transaction.
-- The relay publishes rows in id order and stamps published_at once the broker confirmed.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        text   NOT NULL UNIQUE,
    event_type      text   NOT NULL,
    account_id      text   NOT NULL,
    conversation_id text   COLLATE "C" NOT NULL,
    sequence        bigint NOT NULL,
    -- json, not jsonb: the envelope is published byte for byte as the service wrote it.
    payload         json   NOT NULL,
    traceparent     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);

-- What the relay scans: only the pending rows, in commit order.
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE published_at IS NULL;
