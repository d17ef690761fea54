//! `muictl user-type`.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::tenants;

#[derive(Debug, Subcommand)]
pub enum UserTypeCmd {
    /// Add (or rename) a user type of a tenant.
    Add {
        /// The tenant.
        slug: String,
        /// The id rows give in `user_type_id`.
        type_id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
    },
}

impl UserTypeCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            UserTypeCmd::Add {
                slug,
                type_id,
                name,
            } => {
                let t = super::find(conn, &slug)?;
                let id = type_id.trim();
                if id.is_empty() || id.chars().count() > 50 {
                    bail!("a user type id must be 1 to 50 characters: {id:?}");
                }
                tenants::add_user_type(conn, t.tenant_id(), id, name.as_deref().unwrap_or(id))?;
                writeln!(
                    out,
                    "user types of {}: {}",
                    t.slug,
                    tenants::user_types_of(conn, t.tenant_id())?.join(", ")
                )?;
            }
        }
        Ok(())
    }
}
