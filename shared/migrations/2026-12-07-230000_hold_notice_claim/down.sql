ALTER TABLE import_files DROP COLUMN hold_notice_claimed_until;
