//! The SQL a chunk runs, in one place: the fixed statements (the `.sql` files of this folder)
//! and the generated ones. Public so that tests can check their plans
//! (`tests/tests/plans.rs` EXPLAINs each under empty, tiny, stale and fresh statistics).
//!
//! Parameters are given with each statement; `users_stage` is the chunk's staging table
//! ([`create_staging`]).

/// Locks the existing users among the staged rows: $1 tenant (bigint), $2 file (bigint).
pub const LOCK_EXISTING: &str = include_str!("lock_existing.sql");
/// Releases the active permits of users: $1 tenant (bigint), $2 unique ids (text[]).
pub const RELEASE_PERMITS: &str = include_str!("release_permits.sql");
/// Takes rows out of the staging table: $1 row numbers (bigint[]).
pub const UNSTAGE: &str = include_str!("unstage.sql");
/// Adds a chunk's counts to its file: $1 file, $2..$8 counts (all bigint).
pub const COUNT_CHUNK: &str = include_str!("count_chunk.sql");
/// The users of a tenant holding emails: $1 tenant (bigint), $2 lowercased values (text[]).
pub const EMAIL_OWNERS: &str = include_str!("email_owners.sql");
/// The users of a tenant holding user names: $1 tenant (bigint), $2 lowercased values
/// (text[]).
pub const USER_NAME_OWNERS: &str = include_str!("user_name_owners.sql");
/// After the write, the users of the chunk whose email another user holds: $1 tenant, $2 file
/// (bigint), $3 unique ids (text[]).
pub const EMAIL_CONFLICTS: &str = include_str!("email_conflicts.sql");
/// After the write, the users of the chunk whose user name another user holds: $1 tenant, $2
/// file (bigint), $3 unique ids (text[]).
pub const USER_NAME_CONFLICTS: &str = include_str!("user_name_conflicts.sql");

/// The generated update (`generated/update.sql`): $1 tenant, $2 file (bigint), $3 the
/// tenant's archive-on-inactive setting (boolean), $4 the fields that get the suffix (text[]),
/// $5 the unique ids just locked (text[]).
pub fn update() -> &'static str {
    &crate::upsert::statements().update
}

/// The generated insert (`generated/insert.sql`): $1 tenant, $2 file (bigint), $3 the
/// tenant's archive-on-inactive setting (boolean), $4 the fields that get the suffix (text[]).
pub fn insert() -> &'static str {
    &crate::upsert::statements().insert
}

/// `CREATE TEMP TABLE IF NOT EXISTS users_stage (...) ON COMMIT DELETE ROWS`.
pub fn create_staging() -> &'static str {
    crate::staging::create_statement()
}
