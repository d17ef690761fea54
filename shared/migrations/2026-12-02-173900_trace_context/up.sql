-- One OpenTelemetry trace per file (docs/observability.md). NULL when tracing is off.
-- trace_id: the file's trace, shown by `muictl files show`; trace_context: the W3C
-- traceparent/tracestate of ingest's span for the file, the parent of the dispatcher's
-- spans (the fair dispatcher hands chunks out long after ingest published them).
ALTER TABLE import_files ADD COLUMN trace_id text, ADD COLUMN trace_context jsonb;
-- The trace context of the span that wrote a message into the outbox, put in the
-- message's headers when the relay publishes it.
ALTER TABLE outbox ADD COLUMN trace_context jsonb;
