//! A PostgreSQL database of its own per test, and where the services under test are.

use anyhow::Context;
use diesel::prelude::*;

/// Base URL of the PostgreSQL server tests create databases on.
pub fn base_database_url() -> String {
    std::env::var("MUI_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// RabbitMQ URL for tests.
pub fn amqp_url() -> String {
    std::env::var("MUI_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A database of its own, migrated, dropped on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    /// The server's base URL it was created through (and is dropped through).
    base: String,
    /// URL of the test's database.
    pub url: String,
}

impl TestDb {
    /// Creates and migrates a fresh database.
    pub fn new() -> anyhow::Result<Self> {
        Self::new_on(&base_database_url())
    }

    /// [`TestDb::new`] on the server at `base` (a URL of one of its databases), e.g. a
    /// private cluster of the test's own ([`crate::private::PrivatePostgres`]).
    pub fn new_on(base: &str) -> anyhow::Result<Self> {
        let base = base.to_owned();
        let name = unique("mui_t");
        let mut admin = PgConnection::establish(&base).context("connecting to PostgreSQL")?;
        diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin)?;
        let url = replace_db(&base, &name);
        let mut conn = PgConnection::establish(&url)?;
        mui_shared::db::migrate(&mut conn)?;
        Ok(Self { name, base, url })
    }

    /// A new connection to the test database.
    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("test database reachable")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.base) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

fn replace_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && !url[..i].ends_with('/') => {
            let rest = &url[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{db}{query}", &url[..i])
        }
        _ => format!("{url}/{db}"),
    }
}

/// Registers a file of `chunks` chunks and `rows` rows with header `header` for tenant
/// `tenant`, as ingest leaves it for the workers (`importing`), and returns its id: for tests
/// that hand chunks to the worker's import directly.
pub fn register_file(
    conn: &mut PgConnection,
    tenant: i64,
    name: &str,
    header: &[impl AsRef<str>],
    chunks: i32,
    rows: i64,
) -> QueryResult<i64> {
    use mui_shared::schema::import_files;
    let header: Vec<&str> = header.iter().map(AsRef::as_ref).collect();
    diesel::insert_into(import_files::table)
        .values((
            import_files::tenant_id.eq(tenant),
            import_files::file_name.eq(name),
            import_files::arrival_key.eq(format!("test:{tenant}:{name}")),
            import_files::size_bytes.eq(10),
            import_files::sha256.eq("x"),
            import_files::state.eq("importing"),
            import_files::total_chunks.eq(chunks),
            import_files::rows_total.eq(rows),
            import_files::header.eq(serde_json::json!(header)),
        ))
        .returning(import_files::id)
        .get_result(conn)
}
