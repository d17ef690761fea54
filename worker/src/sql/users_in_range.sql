-- The users of tenant $1 whose unique_id lies from $2 to $3 (text, inclusive, in the
-- database's order), in key order, at most $4 (bigint) of them: what the digest check reads
-- for a chunk whose rows come in unique_id order (most exports are sorted by it), where
-- reading the chunk's stretch of the primary key is several times cheaper than probing it once
-- per row. The limit bounds the read when the stretch holds many more users than the chunk
-- (an unsorted chunk, or a tenant with many users the file does not name): the worker then
-- probes per row (`same_digest.sql`). Only the key's index is read, from $2 to at most $4
-- entries further, whatever the statistics say.
SELECT unique_id, last_file_id, archived_at IS NULL AS live, row_digest
FROM users
WHERE tenant_id = $1 AND unique_id >= $2 AND unique_id <= $3
ORDER BY tenant_id, unique_id
LIMIT $4
