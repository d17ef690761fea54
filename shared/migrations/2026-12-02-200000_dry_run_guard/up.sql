-- Dry run, mass-deactivation guard, readable reports (issue 17).

-- A file named *.validate.csv is checked like an import and changes nothing.
ALTER TABLE import_files ADD COLUMN dry_run BOOLEAN NOT NULL DEFAULT false;

-- The mass-deactivation guard: a file that would deactivate or archive more than its
-- tenant's threshold is held before any change ('held'), until the operator approves
-- ('approved': imported as uploaded) or rejects it ('rejected': dropped, state 'failed').
ALTER TABLE import_files
    ADD COLUMN hold TEXT CHECK (hold IN ('held', 'approved', 'rejected')),
    -- Users the file would deactivate or archive, and the tenant's active users then.
    ADD COLUMN hold_users BIGINT,
    ADD COLUMN hold_active_users BIGINT,
    ADD COLUMN hold_decided_at TIMESTAMPTZ,
    ADD COLUMN hold_decided_by TEXT,
    -- The tenant was mailed that the file is held.
    ADD COLUMN hold_notified_at TIMESTAMPTZ;

-- The users a held file would deactivate or archive (the held mail's attachment).
CREATE TABLE file_deactivations (
    file_id   BIGINT NOT NULL REFERENCES import_files (id) ON DELETE CASCADE,
    unique_id TEXT NOT NULL,
    PRIMARY KEY (file_id, unique_id)
);

-- A queued chunk the dispatcher must not hand out: the chunks of a held file (until it is
-- approved) and of a dry run (whose worker takes them all in one transaction). Such a file
-- still counts as its tenant's oldest open file, so the tenant's later files wait behind it.
ALTER TABLE chunk_queue ADD COLUMN held BOOLEAN NOT NULL DEFAULT false;

ALTER TABLE tenants
    -- Hold a file that would deactivate more than this share (percent) of the tenant's
    -- active users; 0 switches the guard off.
    ADD COLUMN guard_percent INTEGER NOT NULL DEFAULT 10
        CHECK (guard_percent BETWEEN 0 AND 100),
    -- ... and at least this many users.
    ADD COLUMN guard_min_users INTEGER NOT NULL DEFAULT 25 CHECK (guard_min_users >= 0),
    -- Mail a short report also when a file imported with no failures.
    ADD COLUMN success_mail BOOLEAN NOT NULL DEFAULT false,
    -- The tenant's own header names for our columns: {"employee id": "unique_id"}, keys
    -- normalised as headers are (lower case, trimmed, spaces and dashes as '_').
    ADD COLUMN header_aliases JSONB NOT NULL DEFAULT '{}'::jsonb;
