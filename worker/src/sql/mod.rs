//! The SQL a chunk runs, in one place: the fixed statements (the `.sql` files of this folder)
//! and the generated ones. Public so that tests can check their plans
//! (`tests/tests/plans.rs` EXPLAINs each under empty, tiny, stale and fresh statistics).
//!
//! Parameters are given with each statement; `users_stage` is the chunk's staging table
//! ([`create_staging`]).

/// Run first in every chunk's transaction. The hot statements are written so that their only
/// cheap plan probes the key (see each one); this takes away the one alternative that no way
/// of writing a statement can: a sequential scan of a table while it is tiny. Cheap then, it
/// is a trap in any plan that outlives it (a cached statement's generic plan is kept until the
/// next ANALYZE, which with autovacuum off may never come), and the plan test forbids it.
/// (diesel does not cache `sql_query` statements, so these are planned for their parameters
/// at every execution today.) And no JIT: with sequential scans off, a plan that must still
/// scan the staging table costs more than `jit_above_cost`, and compiling the generated update
/// took one to two seconds per chunk. And no bitmap scans: every probe looks up one key and
/// finds at most a few rows, for which a bitmap (built, then walked) costs more than reading
/// the index entries in order; the email and user name probes, planned as bitmap scans, spent
/// a third of their time there.
pub const PLANNER_SETTINGS: &str = "SELECT set_config('enable_seqscan', 'off', true), \
     set_config('enable_bitmapscan', 'off', true), set_config('jit', 'off', true)";

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

/// Which rows of a chunk would change nothing, by the digest stored with their user: $1
/// tenant, $2 file (bigint), $3 unique ids (text[]), $4 digests (bytea[]), $5 row numbers
/// (bigint[]), $6 whether each row may be left alone (boolean[]).
pub const SAME_DIGEST: &str = include_str!("same_digest.sql");

/// The users of a tenant in a stretch of unique ids, in key order (for a chunk in unique_id
/// order, the digest check's cheaper read): $1 tenant (bigint), $2 and $3 the first and last
/// unique id (text), $4 at most this many (bigint).
pub const USERS_IN_RANGE: &str = include_str!("users_in_range.sql");

/// Whether the tenant has an unfinished file older than this one: $1 tenant, $2 file
/// (bigint).
pub const OLDER_OPEN: &str = include_str!("older_open.sql");

/// The generated statement that finds the staged rows that would change nothing (`generated/skip_unchanged.sql`): $1 tenant, $2 file (bigint), $3 the tenant's
/// archive-on-inactive setting (boolean), $4 the fields that get the suffix (text[]), $5 the
/// rows whose unique_id another row of the file has too (bigint[]).
pub fn skip_unchanged() -> &'static str {
    &crate::upsert::statements().skip_unchanged
}

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
