-- Finds the users of tenant $1 that the chunk's rows name, and which rows would change
-- nothing by their digest: $2 file (bigint); per row, in four arrays of the same length,
-- $3 its unique_id (text[]), $4 its digest (bytea[]), $5 its row number (bigint[]), $6
-- whether it may be left alone at all (boolean[]: not `active=0`, not a unique_id another row
-- of the file has too; see `upsert::skip_unchanged_statement`).
--
-- A row is the same when the user was last written, by an older file, with the same digest,
-- and is not archived: applying a row again to the user it wrote changes nothing, while an
-- archived user's suffixes depend on more than the row. A digest not known (NULL) is not the
-- same. Nothing is staged for this: the rows go as four arrays, and only the rows returned
-- not the same (and the new users) are copied into the staging table afterwards. Each row is
-- one probe of the primary key (LATERAL, OFFSET 0), whatever the statistics say; a row not
-- returned has no user.
SELECT k.row_no,
  COALESCE(k.may_skip AND u.last_file_id < $2 AND u.archived_at IS NULL
    AND u.row_digest = k.digest, FALSE) AS same
FROM unnest($3::text[], $4::bytea[], $5::bigint[], $6::boolean[])
  AS k(unique_id, digest, row_no, may_skip)
CROSS JOIN LATERAL (
  SELECT last_file_id, archived_at, row_digest
  FROM users WHERE tenant_id = $1 AND unique_id = k.unique_id OFFSET 0) u
