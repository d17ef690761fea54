-- Rows of a file that a later file of the same tenant had already written (its dead-lettered
-- chunk replayed after the later file was imported): arrival order says the later file wins,
-- so they change nothing, and the report counts them apart from "unchanged".
ALTER TABLE import_files ADD COLUMN rows_superseded BIGINT NOT NULL DEFAULT 0;
