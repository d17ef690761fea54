//! `muictl login-source`.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::tenants;

#[derive(Debug, Subcommand)]
pub enum LoginSourceCmd {
    /// Add login sources to a tenant.
    Add {
        /// The tenant.
        slug: String,
        /// Login source names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

impl LoginSourceCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            LoginSourceCmd::Add { slug, names } => {
                let t = super::find(conn, &slug)?;
                for n in &names {
                    let n = n.trim();
                    if n.is_empty() || n.chars().count() > 100 {
                        bail!("a login source name must be 1 to 100 characters: {n:?}");
                    }
                    tenants::add_login_source(conn, t.tenant_id(), n)?;
                }
                writeln!(
                    out,
                    "login sources of {}: {}",
                    t.slug,
                    tenants::login_sources_of(conn, t.tenant_id())?.join(", ")
                )?;
            }
        }
        Ok(())
    }
}
