-- Adds a chunk's counts to file $1 and returns its progress, to tell whether this chunk
-- was the file's last.
UPDATE import_files SET chunks_done = chunks_done + 1,
  rows_inserted = rows_inserted + $2, rows_updated = rows_updated + $3,
  rows_unchanged = rows_unchanged + $4, rows_failed = rows_failed + $5,
  users_archived = users_archived + $6, users_reactivated = users_reactivated + $7,
  permits_released = permits_released + $8, rows_superseded = rows_superseded + $9
WHERE id = $1
RETURNING chunks_done, total_chunks, state
