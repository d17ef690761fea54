-- Dead letters: every message RabbitMQ dead-lettered to P.dead-letters, recorded by the
-- notifier before it acknowledges it, so the operator can list and replay them
-- (`muictl dead-letters`). No foreign keys: a hand-made or undecodable message names no
-- (or no existing) tenant or file and must still be recorded.
CREATE TABLE dead_letters (
    id             BIGSERIAL PRIMARY KEY,
    -- Logical queue the message came from ('chunks' or 'notify'); NULL if unknown.
    queue          VARCHAR,
    -- The queue's full name, from the x-first-death-queue header.
    source_queue   TEXT NOT NULL,
    tenant_id      BIGINT,
    file_id        BIGINT,
    chunk_no       INTEGER,
    -- The broker's reason (x-first-death-reason): delivery_limit, rejected, expired, maxlen.
    reason         TEXT NOT NULL,
    -- The last error a service noted for this message (message_errors), if any.
    last_error     TEXT,
    -- Deliveries the message had before it was dead-lettered.
    attempts       INTEGER NOT NULL,
    died_at        TIMESTAMPTZ NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    payload        BYTEA NOT NULL,
    payload_sha256 BYTEA NOT NULL,
    replayed_at    TIMESTAMPTZ,
    -- A redelivery of the same dead letter (crash before the ack) is recorded once (and so
    -- are identical messages dying in the same queue in the same second: one replay is
    -- what both need).
    UNIQUE (payload_sha256, source_queue, died_at)
);
CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, id);
CREATE INDEX dead_letters_file ON dead_letters (file_id) WHERE replayed_at IS NULL;

-- The last error a worker or the notifier hit handling a message, by the SHA-256 of its
-- payload, so the reason a message failed reaches its dead-letter record (AMQP has no way
-- to attach it to a requeued or rejected message). Removed when the message succeeds or
-- is recorded as a dead letter.
CREATE TABLE message_errors (
    payload_sha256 BYTEA NOT NULL,
    queue          VARCHAR NOT NULL,
    file_id        BIGINT,
    error          TEXT NOT NULL,
    failures       INTEGER NOT NULL DEFAULT 1,
    noted_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (payload_sha256, queue)
);
