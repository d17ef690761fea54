-- Releases, with the date, every active permit of the users $2 of tenant $1 (archived by an
-- active=0 row); already released permits keep their date.
UPDATE permits SET state = 'released', released_at = now()
WHERE tenant_id = $1 AND unique_id = ANY($2) AND state = 'active'
