DROP TRIGGER users_forget_row_digest ON users;
DROP FUNCTION mui_forget_row_digest();
ALTER TABLE users DROP COLUMN row_digest;
