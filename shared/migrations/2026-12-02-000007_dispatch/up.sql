-- Fair dispatch (docs/dispatch.md).
--
-- ingest no longer hands a file's chunks straight to the broker: it queues them here, and the
-- dispatcher (one leader among the workers) hands them to the broker in fair order across
-- tenants, a bounded number in flight, one file of a tenant at a time. A worker deletes the
-- row in the transaction that imports the chunk, so a row here is a chunk not imported yet.
CREATE TABLE chunk_queue (
    tenant_id     BIGINT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    file_id       BIGINT NOT NULL REFERENCES import_files (id) ON DELETE CASCADE,
    chunk_no      INTEGER NOT NULL,
    -- Data rows in the chunk: the dispatcher shares workers between tenants by rows.
    rows          INTEGER NOT NULL,
    -- The chunk message (chunk.v1, JSON) the worker imports.
    payload       BYTEA NOT NULL,
    queued_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set by the dispatcher just before it publishes the chunk's reference; NULL: waiting.
    dispatched_at TIMESTAMPTZ,
    -- The broker confirmed the reference. A new leader hands out again what its predecessor
    -- marked but may not have published.
    confirmed     BOOLEAN NOT NULL DEFAULT false,
    -- The chunk was dead-lettered: not in flight, and it no longer holds back its tenant's
    -- later files (`muictl dead-letters replay` clears it).
    dead_at       TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, file_id, chunk_no)
);
-- The payload is JSON already cut to a bound; compressing it on the way in and out of TOAST
-- only costs CPU on the import path.
ALTER TABLE chunk_queue ALTER COLUMN payload SET STORAGE EXTERNAL;

-- Files not finished yet, so the dispatcher finds a tenant's oldest open file by an index
-- scan however many finished files the table holds (and whatever its statistics say).
CREATE INDEX import_files_open ON import_files (tenant_id, id)
    WHERE state IN ('received', 'importing');

-- Workers alive, and how many chunks each imports at once: the dispatcher keeps about that
-- many chunks in flight, so the broker's queue stays short and a newcomer is served next.
CREATE TABLE workers (
    name        TEXT PRIMARY KEY,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    concurrency INTEGER NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    seen_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
