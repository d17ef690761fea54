ALTER TABLE outbox DROP COLUMN trace_context;
ALTER TABLE import_files DROP COLUMN trace_id, DROP COLUMN trace_context;
