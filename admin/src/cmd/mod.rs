//! One module per command group: its clap subcommands and what they print. The queries they
//! run live in `mui_shared`.

use anyhow::Context;
use diesel::PgConnection;
use mui_shared::tenants::{self, Tenant};

pub mod dead_letters;
pub mod files;
pub mod login_source;
pub mod migrate;
pub mod permit;
pub mod queue;
pub mod tenant;
pub mod user_type;
pub mod users;

/// The tenant with this slug, or an error naming it.
pub fn find(conn: &mut PgConnection, slug: &str) -> anyhow::Result<Tenant> {
    tenants::find_by_slug(conn, slug)?
        .with_context(|| format!("no tenant {slug:?} (see `muictl tenant list`)"))
}
