//! Database access: the connection pool, embedded migrations, and running diesel (which is
//! synchronous) from async code.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

/// A pool of PostgreSQL connections.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
/// A connection taken from [`PgPool`].
pub type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// The schema's migrations, compiled into every binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Key (two-int form, a key space apart from the one-bigint keys that lock import files) of
/// the advisory lock that serialises migrations, so that processes starting at once do not
/// race each other.
const MIGRATION_LOCK_KEY: &str = "7173481, 1";

/// The constraints keeping a user's email and user name their own within the tenant
/// (migration 000008): deferred, checked at commit or when the worker asks.
pub const IDENTITY_CONSTRAINTS: [&str; 2] = ["users_email_unique", "users_user_name_unique"];

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The pool could not hand out a connection (database down or unreachable).
    #[error("could not get a database connection")]
    Pool(#[from] diesel::r2d2::PoolError),
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] diesel::result::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The blocking task running the query panicked or was cancelled.
    #[error("database task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Builds a pool without connecting yet: services start while the database is down and
/// connect when it comes back. Every connection asks the server to notice soon when this
/// process's host goes silent ([`DeadPeerTimeouts`]).
pub fn pool(database_url: &str, max_size: u32) -> PgPool {
    let manager = ConnectionManager::<PgConnection>::new(database_url);
    Pool::builder()
        .max_size(max_size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .test_on_check_out(true)
        .connection_customizer(Box::new(DeadPeerTimeouts))
        .build_unchecked(manager)
}

/// The server-side settings, for this session, that end it soon after its client's host
/// vanished (a network cut, a frozen machine: no TCP reset ever comes). Without them
/// PostgreSQL keeps the session, its open transaction and every lock it holds (a chunk's
/// rows, its file's counts row, advisory locks) until TCP keepalive's default of two hours.
/// Keepalive probes after 5 s idle, 3 × 2 s apart; unacknowledged data gives up after 15 s;
/// a transaction left idle for 5 minutes (a client stuck between statements) is ended.
pub const DEAD_PEER_SETTINGS: &str = "SELECT set_config('tcp_keepalives_idle', '5', false), \
     set_config('tcp_keepalives_interval', '2', false), \
     set_config('tcp_keepalives_count', '3', false), \
     set_config('tcp_user_timeout', '15000', false), \
     set_config('idle_in_transaction_session_timeout', '300s', false)";

/// Applies [`DEAD_PEER_SETTINGS`] to every pooled connection.
#[derive(Debug, Clone, Copy)]
pub struct DeadPeerTimeouts;

impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for DeadPeerTimeouts {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        diesel::sql_query(DEAD_PEER_SETTINGS)
            .execute(conn)
            .map(|_| ())
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Applies pending migrations, holding an advisory lock so that concurrent starters wait for
/// each other instead of racing.
pub fn migrate(conn: &mut PgConnection) -> Result<Vec<String>, DbError> {
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")).execute(conn)?;
    let result = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|applied| applied.iter().map(|v| v.to_string()).collect())
        .map_err(|e| DbError::Migration(e.to_string()));
    let unlock =
        diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).execute(conn);
    let applied = result?;
    unlock?;
    Ok(applied)
}

/// Runs `f` with a pooled connection on tokio's blocking pool.
pub async fn run<T, F>(pool: &PgPool, f: F) -> Result<T, DbError>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> Result<T, DbError> + Send + 'static,
{
    let pool = pool.clone();
    // The caller's span, so that logs and trace context (the outbox's) carry on inside.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let mut conn = pool.get().inspect_err(|_| {
            metrics::counter!("mui_database_connect_errors_total").increment(1);
        })?;
        f(&mut conn)
    })
    .await?
}

/// Applies migrations at service start, waiting (with backoff, up to two minutes) for the
/// database to be reachable.
pub async fn migrate_at_start(pool: &PgPool) -> Result<(), DbError> {
    let applied = backoff::future::retry_notify(
        crate::amqp::backoff_policy(Some(Duration::from_secs(120))),
        || async { run(pool, migrate).await.map_err(backoff::Error::transient) },
        |err: DbError, wait: Duration| {
            tracing::warn!(error = %err, retry_in_ms = wait.as_millis() as u64, "DatabaseConnectError");
        },
    )
    .await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "MigrationsApplied");
    }
    Ok(())
}

/// Whether a query error is a violation of one of the [`IDENTITY_CONSTRAINTS`]: another
/// transaction committed the same email or user name first. Retrying sees its value, and
/// the worker's checks then report the row that lost.
pub fn is_identity_conflict(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match err {
        Error::DatabaseError(
            DatabaseErrorKind::ExclusionViolation | DatabaseErrorKind::UniqueViolation,
            info,
        ) => info
            .constraint_name()
            .is_some_and(|c| IDENTITY_CONSTRAINTS.contains(&c)),
        _ => false,
    }
}

/// Whether a database error is worth retrying as it is (connection trouble, deadlock,
/// serialization failure, a violation of an [`IDENTITY_CONSTRAINTS`] by a concurrent
/// commit), as opposed to a fault in the data or the code.
pub fn is_transient(err: &DbError) -> bool {
    match err {
        DbError::Pool(_) | DbError::Task(_) => true,
        DbError::Migration(_) => false,
        DbError::Query(q) => is_transient_query(q),
    }
}

/// [`is_transient`] for a query's error.
pub fn is_transient_query(q: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    if is_identity_conflict(q) {
        return true;
    }
    match q {
        Error::DatabaseError(kind, info) => {
            matches!(
                kind,
                DatabaseErrorKind::SerializationFailure
                    | DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::UnableToSendCommand
            ) || info.message().contains("deadlock")
                || info.message().contains("terminating connection")
                || info.message().contains("server closed the connection")
        }
        Error::BrokenTransactionManager => true,
        _ => false,
    }
}
