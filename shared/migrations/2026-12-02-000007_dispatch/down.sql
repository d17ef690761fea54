DROP TABLE workers;
DROP INDEX import_files_open;
DROP TABLE chunk_queue;
