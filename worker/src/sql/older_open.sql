-- Whether tenant $1 has a file older than file $2 (ids follow arrival) that is not finished:
-- still being read, or with chunks not imported yet (in flight, queued, or dead-lettered and
-- waiting for a replay). While one has, a row of file $2 could still be followed by an older
-- row of the same user, so every row is written with its version (see skip_unchanged in
-- upsert.rs). The tenant's open files are few: read through the import_files_open index,
-- whatever the statistics. (`id + 0`: with `id < $2` the planner, on fresh statistics of a
-- small table, chose a range of the primary key, every tenant's files older than $2.)
SELECT EXISTS (
  SELECT 1 FROM import_files
  WHERE tenant_id = $1 AND state IN ('received', 'importing') AND id + 0 < $2) AS open
