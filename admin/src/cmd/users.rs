//! `muictl users`: a tenant's users.

use std::io::Write;

use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::users;

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// A tenant's users.
    List {
        /// The tenant.
        slug: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// How many users.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

impl UsersCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            UsersCmd::List { slug, json, limit } => {
                let t = super::find(conn, &slug)?;
                let rows = users::list_user_lines(conn, t.tenant_id(), limit)?;
                if json {
                    let v: Vec<_> = rows
                        .iter()
                        .map(|r| serde_json::json!({"unique_id": r.unique_id, "login_source": r.login_source, "first_name": r.first_name, "last_name": r.last_name, "email": r.email, "active": r.active, "archived_at": r.archived_at}))
                        .collect();
                    serde_json::to_writer_pretty(&mut *out, &v)?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{:<20} {:<12} {:<30} {:<32} {:<6} ARCHIVED",
                        "UNIQUE_ID", "LOGIN", "NAME", "EMAIL", "ACTIVE"
                    )?;
                    for r in rows {
                        let name = format!(
                            "{} {}",
                            r.first_name.unwrap_or_default(),
                            r.last_name.unwrap_or_default()
                        );
                        let archived = r
                            .archived_at
                            .map(|d| d.format("%Y-%m-%d").to_string())
                            .unwrap_or_default();
                        writeln!(
                            out,
                            "{:<20} {:<12} {:<30} {:<32} {:<6} {}",
                            r.unique_id,
                            r.login_source,
                            name.trim(),
                            r.email.unwrap_or_default(),
                            if r.active { 1 } else { 0 },
                            archived
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}
