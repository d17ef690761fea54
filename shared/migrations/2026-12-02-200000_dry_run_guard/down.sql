ALTER TABLE tenants DROP COLUMN header_aliases, DROP COLUMN success_mail,
    DROP COLUMN guard_min_users, DROP COLUMN guard_percent;
ALTER TABLE chunk_queue DROP COLUMN held;
DROP TABLE file_deactivations;
ALTER TABLE import_files DROP COLUMN hold_notified_at, DROP COLUMN hold_decided_by,
    DROP COLUMN hold_decided_at, DROP COLUMN hold_active_users, DROP COLUMN hold_users,
    DROP COLUMN hold, DROP COLUMN dry_run;
