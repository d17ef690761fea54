-- Locks the users of tenant $1 that the staging table holds, in unique_id order (so two
-- chunks lock in the same order and cannot deadlock), and returns their version; the stored
-- values only when file $2 wrote them (another chunk's row then lost to this chunk's row).
-- Each staged id is one probe of the primary key (LATERAL, OFFSET 0, locked there), taken in
-- unique_id order. With `unique_id = ANY(ARRAY(SELECT unique_id FROM users_stage))` the
-- planner chose, whenever it thought the tenant small (a table never analyzed, a new tenant
-- after the last ANALYZE), a scan of the tenant's every user filtered by the ids, once per
-- chunk: a large import went quadratic.
SELECT u.unique_id, u.last_file_id, u.last_row, u.was_archived, u.old
FROM (SELECT unique_id FROM users_stage ORDER BY unique_id OFFSET 0) k
CROSS JOIN LATERAL (
  SELECT unique_id, last_file_id, last_row, (archived_at IS NOT NULL) AS was_archived,
    CASE WHEN last_file_id = $2 THEN to_jsonb(users) END AS old
  FROM users WHERE tenant_id = $1 AND unique_id = k.unique_id
  OFFSET 0 FOR UPDATE) u
