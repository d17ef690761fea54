DROP FUNCTION mui_suffix(TEXT, TEXT, INTEGER);
DROP FUNCTION mui_unsuffix(TEXT, TEXT);
ALTER TABLE import_files DROP COLUMN users_archived, DROP COLUMN users_reactivated, DROP COLUMN permits_released;
ALTER TABLE users DROP COLUMN archive_suffix;
ALTER TABLE tenants DROP COLUMN archive_suffix_fields;
