//! `muictl permit`: users' parking permits.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::permits::{self, AddPermitError, NewPermit};

#[derive(Debug, Subcommand)]
pub enum PermitCmd {
    /// Give a user an active permit.
    Add {
        /// The tenant.
        slug: String,
        /// The user's unique_id.
        unique_id: String,
        /// Permit number, unique within the tenant.
        permit_number: String,
        /// Lot name.
        #[arg(long)]
        lot: String,
        /// Active window (e.g. "O: Perm").
        #[arg(long)]
        window: Option<String>,
    },
    /// List a tenant's permits (of one user with --user).
    List {
        /// The tenant.
        slug: String,
        /// Only this user's permits.
        #[arg(long)]
        user: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

impl PermitCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            PermitCmd::Add {
                slug,
                unique_id,
                permit_number,
                lot,
                window,
            } => {
                let t = super::find(conn, &slug)?;
                let permit = NewPermit {
                    tenant: t.tenant_id(),
                    unique_id: &unique_id,
                    permit_number: &permit_number,
                    lot_name: &lot,
                    active_window: window.as_deref(),
                };
                let unique = "permit numbers are unique within a tenant";
                match permits::add_permit(conn, &permit) {
                    Ok(()) => {}
                    Err(AddPermitError::NoSuchUser) => {
                        bail!("tenant {} has no user {unique_id:?}", t.slug)
                    }
                    Err(AddPermitError::Lookup(e)) => return Err(e.into()),
                    Err(AddPermitError::Insert(e)) => {
                        let context = format!("permit {permit_number:?} ({unique})");
                        return Err(anyhow::Error::new(e).context(context));
                    }
                }
                writeln!(out, "permit {permit_number} ({lot}) given to {unique_id}")?;
            }
            PermitCmd::List { slug, user, json } => {
                let t = super::find(conn, &slug)?;
                let rows = permits::list_permit_lines(conn, t.tenant_id(), user.as_deref())?;
                if json {
                    let v: Vec<_> = rows
                        .iter()
                        .map(|r| serde_json::json!({"permit_number": r.permit_number, "unique_id": r.unique_id, "lot_name": r.lot_name, "active_window": r.active_window, "state": r.state, "released_at": r.released_at}))
                        .collect();
                    serde_json::to_writer_pretty(&mut *out, &v)?;
                    writeln!(out)?;
                } else {
                    writeln!(
                        out,
                        "{:<12} {:<20} {:<24} {:<10} RELEASED",
                        "PERMIT", "USER", "LOT", "STATE"
                    )?;
                    for r in rows {
                        writeln!(
                            out,
                            "{:<12} {:<20} {:<24} {:<10} {}",
                            r.permit_number,
                            r.unique_id,
                            r.lot_name,
                            r.state,
                            r.released_at
                                .map(|d| d.format("%Y-%m-%d").to_string())
                                .unwrap_or_default()
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}
