-- The digest of the row that last wrote each user (16 bytes of SHA-256 over the row's checked
-- values; see the worker's `digest.rs`). A re-import compares it with the new row's digest
-- instead of comparing every column: equal, and the user not archived, means the row would
-- change nothing. NULL: not known (users written before this column, or changed by anything
-- but the worker's write); such a user is compared column by column, as before.
ALTER TABLE users ADD COLUMN row_digest BYTEA;

-- Any change to a user that does not set a new digest (an operator's UPDATE, a tool) makes the
-- stored digest unknown, so that the next import compares the user's values again rather
-- than trust a digest of values that are no longer there. The worker's own writes always set
-- the row's digest; when it equals the stored one, the digest is cleared too (harmless: the
-- user is then compared by value once).
CREATE FUNCTION mui_forget_row_digest() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.row_digest := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_forget_row_digest
    BEFORE UPDATE ON users
    FOR EACH ROW
    WHEN (NEW.row_digest IS NOT NULL AND NEW.row_digest IS NOT DISTINCT FROM OLD.row_digest)
    EXECUTE FUNCTION mui_forget_row_digest();
