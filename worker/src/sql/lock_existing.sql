-- Locks the users of tenant $1 that the staging table holds, in unique_id order (so two
-- chunks lock in the same order and cannot deadlock), and returns their version; the stored
-- values only when file $2 wrote them (another chunk's row then lost to this chunk's row).
-- Users are found by probing the primary key with the staged ids (= ANY(ARRAY(...))), never
-- by joining on the tenant: during a bulk load the table's statistics lag far behind, and a
-- join plan chosen on them scans the tenant's every user per chunk.
SELECT u.unique_id, u.last_file_id, u.last_row, (u.archived_at IS NOT NULL) AS was_archived,
  CASE WHEN u.last_file_id = $2 THEN to_jsonb(u) END AS old
FROM users u
WHERE u.tenant_id = $1 AND u.unique_id = ANY(ARRAY(SELECT unique_id FROM users_stage))
ORDER BY u.unique_id FOR UPDATE
