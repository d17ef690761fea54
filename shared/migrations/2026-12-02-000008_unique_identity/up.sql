-- An email or a user name belongs to one user of a tenant at most, compared
-- case-insensitively, among the users that are not archived (an archived user's values
-- carry the archive suffix and are freed on purpose: two users archived the same year from
-- one recycled address must both be archivable). The worker checks rows before it writes
-- them and reports the ones that lose (email_taken, user_name_taken); these constraints are
-- what holds when two chunks (on any workers) commit the same new value at the same moment.
--
-- Why EXCLUDE ... DEFERRABLE INITIALLY DEFERRED and not a unique index: PostgreSQL checks a
-- non-deferrable unique index row by row, so one UPDATE in which two users swap their emails
-- would fail halfway. A deferred check runs at commit, or when the worker asks for it (SET
-- CONSTRAINTS ... IMMEDIATE at the end of its write, inside a savepoint, so that a loser is
-- reported precisely instead of failing the chunk). A UNIQUE constraint may be deferrable but
-- not partial nor on an expression; an exclusion constraint with `=` on a btree may be both,
-- and guarantees the same thing.
--
-- Both are led by tenant_id, so they stay enforceable if users are distributed by tenant.
-- The identity lookups keep the value-only indexes of 000004 (their plans do not depend on
-- statistics); these indexes serve the constraints.
--
-- A deployment whose users already share a value would make the constraint fail with one
-- key named; this names every one (up to 50) and stops the migration, changing nothing.
-- Resolve them (docs/errors.md, "Existing duplicates") and start the service again.
DO $$
DECLARE
    dups TEXT;
BEGIN
    SELECT string_agg(format('tenant %s %s %L: %s user(s), unique_id %s', tenant_id, what,
                             value, n, array_to_string(ids, ', ')), E'\n' ORDER BY tenant_id, what, value)
    INTO dups
    FROM (
        SELECT tenant_id, what, value, n, ids FROM (
            SELECT tenant_id, 'email' AS what, lower(email) AS value, count(*) AS n,
                   (array_agg(unique_id ORDER BY unique_id))[1:5] AS ids
            FROM users WHERE email IS NOT NULL AND archived_at IS NULL
            GROUP BY tenant_id, lower(email) HAVING count(*) > 1
            UNION ALL
            SELECT tenant_id, 'user_name', lower(user_name), count(*),
                   (array_agg(unique_id ORDER BY unique_id))[1:5]
            FROM users WHERE user_name IS NOT NULL AND archived_at IS NULL
            GROUP BY tenant_id, lower(user_name) HAVING count(*) > 1
        ) d
        ORDER BY tenant_id, what, value
        LIMIT 50
    ) first50;
    IF dups IS NOT NULL THEN
        RAISE EXCEPTION E'unique_identity: users that are not archived share an email or user name (compared case-insensitively) within a tenant; give each its own, or archive all but one, then restart:\n%', dups;
    END IF;
END
$$;

ALTER TABLE users
    ADD CONSTRAINT users_email_unique
        EXCLUDE USING btree (tenant_id WITH =, lower(email) WITH =)
        WHERE (email IS NOT NULL AND archived_at IS NULL)
        DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT users_user_name_unique
        EXCLUDE USING btree (tenant_id WITH =, lower(user_name) WITH =)
        WHERE (user_name IS NOT NULL AND archived_at IS NULL)
        DEFERRABLE INITIALLY DEFERRED;
