-- Managed User Import: initial schema.
-- Every tenant-owned row carries tenant_id; every query that touches tenant data filters on it.

CREATE TABLE tenants (
    id                    BIGSERIAL PRIMARY KEY,
    -- The tenant's drop folder name under DROP_ROOT (also its SFTP account name).
    slug                  VARCHAR(64) NOT NULL UNIQUE,
    name                  TEXT NOT NULL,
    -- "Reply-to Admin Email Address": the sender of failure reports.
    reply_to_email        TEXT,
    -- "Failed Import Email": one or more recipients.
    failed_import_emails  TEXT[] NOT NULL DEFAULT '{}',
    archive_on_inactive   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE login_sources (
    tenant_id  BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name       VARCHAR(100) NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE user_types (
    tenant_id  BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    type_id    VARCHAR(50) NOT NULL,
    name       TEXT NOT NULL,
    PRIMARY KEY (tenant_id, type_id)
);

-- Users, keyed by tenant + unique_id. Column lengths match shared::domain::Column::max_len.
CREATE TABLE users (
    tenant_id             BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    unique_id             VARCHAR(100) NOT NULL,
    login_source          VARCHAR(100) NOT NULL,
    first_name            VARCHAR(100),
    last_name             VARCHAR(100),
    user_name             VARCHAR(150),
    email                 VARCHAR(254),
    street                VARCHAR(200),
    city                  VARCHAR(100),
    province              VARCHAR(100),
    postal_code           VARCHAR(20),
    street2               VARCHAR(200),
    city2                 VARCHAR(100),
    state2                VARCHAR(100),
    zip2                  VARCHAR(20),
    phone_cell            VARCHAR(40),
    user_type_id          VARCHAR(50),
    employ_no             VARCHAR(50),
    employee_phone        VARCHAR(40),
    student_no            VARCHAR(50),
    student_phone         VARCHAR(40),
    drivers_license_num   VARCHAR(50),
    drivers_license_prov  VARCHAR(50),
    date_of_birth         DATE,
    active                BOOLEAN NOT NULL DEFAULT TRUE,
    archived_at           TIMESTAMPTZ,
    -- Version of the row that last wrote this user: (import file id, row number).
    -- File ids grow in arrival order, so an upsert only applies when its version is newer.
    -- This keeps "later row wins" and "files take effect in arrival order" true when
    -- chunks of a file are imported by several workers in any order.
    last_file_id          BIGINT NOT NULL,
    last_row              BIGINT NOT NULL,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, unique_id)
);

CREATE TABLE permits (
    id             BIGSERIAL PRIMARY KEY,
    tenant_id      BIGINT NOT NULL,
    unique_id      VARCHAR(100) NOT NULL,
    permit_number  VARCHAR(50) NOT NULL,
    lot_name       TEXT NOT NULL,
    active_window  TEXT,
    state          VARCHAR(20) NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'released')),
    released_at    TIMESTAMPTZ,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, unique_id) REFERENCES users(tenant_id, unique_id) ON DELETE CASCADE,
    UNIQUE (tenant_id, permit_number)
);
CREATE INDEX permits_user ON permits (tenant_id, unique_id);

-- One row per arrival of a file in a drop folder.
CREATE TABLE import_files (
    id               BIGSERIAL PRIMARY KEY,
    tenant_id        BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    file_name        TEXT NOT NULL,
    -- Identifies this arrival (device, inode, mtime, size, content hash): the same bytes
    -- still sitting in the folder after a crash are recognised; a new upload is a new file.
    arrival_key      TEXT NOT NULL UNIQUE,
    size_bytes       BIGINT NOT NULL,
    sha256           VARCHAR(64) NOT NULL,
    -- received -> importing -> done, or failed (file-level error, nothing imported).
    state            VARCHAR(20) NOT NULL DEFAULT 'received'
                     CHECK (state IN ('received', 'importing', 'done', 'failed')),
    encoding         VARCHAR(40),
    delimiter        VARCHAR(10),
    header           JSONB,
    ignored_columns  JSONB,
    total_chunks     INTEGER,
    chunks_done      INTEGER NOT NULL DEFAULT 0,
    rows_total       BIGINT,
    rows_inserted    BIGINT NOT NULL DEFAULT 0,
    rows_updated     BIGINT NOT NULL DEFAULT 0,
    rows_unchanged   BIGINT NOT NULL DEFAULT 0,
    rows_failed      BIGINT NOT NULL DEFAULT 0,
    error_code       VARCHAR(40),
    error_message    TEXT,
    archived_name    TEXT,
    -- pending -> sending -> sent; or not_needed (nothing failed), or held (no mail settings,
    -- or an address the mail server refuses; the reason is in notify_detail)
    notify_status    VARCHAR(20) NOT NULL DEFAULT 'pending',
    notify_detail    TEXT,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    queued_at        TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ,
    notified_at      TIMESTAMPTZ
);
CREATE INDEX import_files_tenant ON import_files (tenant_id, id);

-- A chunk's marker: inserted in the same transaction as the chunk's users, so a redelivered
-- chunk is recognised and changes nothing.
CREATE TABLE file_chunks (
    file_id    BIGINT NOT NULL REFERENCES import_files(id) ON DELETE CASCADE,
    chunk_no   INTEGER NOT NULL,
    rows       INTEGER NOT NULL,
    failed     INTEGER NOT NULL,
    done_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, chunk_no)
);

-- Failure records as collected by the notifier: one per failed row.
CREATE TABLE row_failures (
    file_id     BIGINT NOT NULL REFERENCES import_files(id) ON DELETE CASCADE,
    row_number  BIGINT NOT NULL,
    fields      JSONB NOT NULL,
    errors      JSONB NOT NULL,
    PRIMARY KEY (file_id, row_number)
);

-- Transactional outbox: messages written in the same transaction as the state they announce,
-- published with confirms by a relay and deleted once the broker confirmed them.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    queue        VARCHAR(100) NOT NULL,
    payload      BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A relay claims a batch for a while; a relay that died lets its claim expire.
    claimed_until TIMESTAMPTZ
);
