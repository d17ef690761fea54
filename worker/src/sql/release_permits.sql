-- Releases, with the date, every active permit of the users $2 of tenant $1 (archived by an
-- active=0 row); already released permits keep their date.
-- The permits are found by one probe of permits_user per user (LATERAL over the ids, OFFSET
-- 0) and updated by their row address: with `tenant_id = $1 AND unique_id = ANY($2)` the
-- planner read the tenant's every permit when it thought the tenant small. `state =
-- 'active'` is checked again on the row updated (a permit released meanwhile keeps its date).
UPDATE permits SET state = 'released', released_at = now()
WHERE ctid = ANY (ARRAY(
    SELECT p.ctid FROM unnest($2::text[]) AS k(uid)
    CROSS JOIN LATERAL (
      SELECT ctid FROM permits
      WHERE tenant_id = $1 AND unique_id = k.uid AND state = 'active' OFFSET 0) p))
  AND state = 'active'
