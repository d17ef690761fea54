DROP TABLE drop_folder_status;
ALTER TABLE import_files DROP COLUMN notices, DROP COLUMN chunk_max_bytes, DROP COLUMN chunk_rows;
