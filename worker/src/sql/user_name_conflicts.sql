-- After a chunk's write: the users of tenant $1 among $3 (unique ids) last written by file
-- $2 and not archived, whose user_name, lowercased, another user of the tenant that is not
-- archived has too (what the constraint users_user_name_unique forbids), with that other user and
-- the version that last wrote it.
-- Each of the chunk's users is one probe of the primary key (LATERAL over the ids, OFFSET 0):
-- with `unique_id = ANY($3)` and 5,000 ids, a plan chosen on stale statistics (the tenant
-- thought to hold a few hundred users) read the tenant's every user through an index, twice
-- per chunk, and a 1,000,000-row import went quadratic. The others are found by one probe of
-- the users_user_name_ci index each (LATERAL, OFFSET 0, as in user_name_owners.sql), the tenant
-- filtered afterwards.
SELECT w.unique_id, w.last_row, w.user_name AS value, o.unique_id AS other,
  o.last_file_id AS other_file, o.last_row AS other_row
FROM unnest($3::text[]) AS k(uid)
CROSS JOIN LATERAL (
  SELECT unique_id, last_file_id, last_row, user_name, archived_at FROM users
  WHERE tenant_id = $1 AND unique_id = k.uid OFFSET 0) w
CROSS JOIN LATERAL (
  SELECT unique_id, tenant_id, archived_at, last_file_id, last_row FROM users
  WHERE user_name IS NOT NULL AND lower(user_name) = lower(w.user_name) OFFSET 0) o
WHERE w.last_file_id = $2 AND w.user_name IS NOT NULL AND w.archived_at IS NULL
  AND o.tenant_id = $1 AND o.archived_at IS NULL AND o.unique_id <> w.unique_id
