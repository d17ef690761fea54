-- Chunk payloads compressed with lz4 in TOAST (PostgreSQL 14 and later, built with lz4 as
-- Debian's is). A payload is the chunk's rows as JSON, about 1.2 MB for 5,000 rows; it is
-- written by ingest and deleted by the worker that imports it, and all of it went through
-- the WAL (about 380 MB per 1,000,000-row file, besides the users' own). lz4 shrinks it about
-- threefold for little CPU; migration 000007 kept it uncompressed because the default, pglz,
-- costs far more CPU than it saves. Payloads stored before keep their form; PostgreSQL reads
-- both.
ALTER TABLE chunk_queue
    ALTER COLUMN payload SET STORAGE EXTENDED,
    ALTER COLUMN payload SET COMPRESSION lz4;
