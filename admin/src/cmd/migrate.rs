//! `muictl migrate`.

use std::io::Write;

use diesel::PgConnection;

/// Applies pending migrations and says how many.
pub fn run(conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
    let applied = mui_shared::db::migrate(conn)?;
    writeln!(out, "{} migration(s) applied", applied.len())?;
    Ok(())
}
