ALTER TABLE import_files DROP COLUMN rows_superseded;
