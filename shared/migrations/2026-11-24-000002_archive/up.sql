-- Archive-on-inactive: which fields get the archive suffix, the suffix a user was archived
-- with (so a repeat adds nothing and reactivation can take it off), and per-file counts.

ALTER TABLE tenants
    ADD COLUMN archive_suffix_fields TEXT[] NOT NULL DEFAULT '{last_name,user_name,email}';

ALTER TABLE users
    ADD COLUMN archive_suffix VARCHAR(10);

ALTER TABLE import_files
    ADD COLUMN users_archived     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN users_reactivated  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN permits_released   BIGINT NOT NULL DEFAULT 0;

-- v without the suffix sfx, if it ends with it.
CREATE FUNCTION mui_unsuffix(v TEXT, sfx TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN v IS NULL OR sfx IS NULL OR right(v, length(sfx)) <> sfx THEN v
        ELSE left(v, length(v) - length(sfx))
    END
$$;

-- v with the suffix sfx appended, cut so that the result fits in maxlen characters.
CREATE FUNCTION mui_suffix(v TEXT, sfx TEXT, maxlen INTEGER) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN v IS NULL OR sfx IS NULL THEN v
        ELSE left(v, maxlen - length(sfx)) || sfx
    END
$$;
