-- Tenant isolation.
--
-- How a file is cut into chunks is fixed when it is registered, so that a retry after a
-- crash cuts it exactly as the first attempt did even if CHUNK_ROWS / CHUNK_MAX_BYTES changed
-- in between (NULL for files registered before this migration: the service's setting then).
ALTER TABLE import_files
    ADD COLUMN chunk_rows INTEGER,
    ADD COLUMN chunk_max_bytes INTEGER,
    -- Things the tenant and the operator must know about a file that are not row failures
    -- and did not stop the import (its bak/ was a link and was set aside, its name was not
    -- UTF-8, it changed while being read…). Shown in the report mail and by muictl.
    ADD COLUMN notices TEXT[] NOT NULL DEFAULT '{}';

-- What ingest last found when it looked at a tenant's drop folder: NULL problem means it
-- could list it. A folder ingest cannot read (a tenant's chmod, a missing folder, a link
-- where the folder should be) is never silent: the operator sees it here and in the logs.
CREATE TABLE drop_folder_status (
    tenant_id  BIGINT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    path       TEXT NOT NULL,
    problem    TEXT,
    -- When the folder came to be in this state (written only when the state changes).
    since      TIMESTAMPTZ NOT NULL DEFAULT now()
);
