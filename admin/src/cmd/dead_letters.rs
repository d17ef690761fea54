//! `muictl dead-letters`: listing and replaying dead-lettered messages.

use std::io::Write;

use anyhow::bail;
use clap::Subcommand;
use diesel::PgConnection;
use mui_shared::deadletters;

#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// Dead letters not yet replayed, oldest first: tenant, file, message, the broker's
    /// reason (delivery_limit: kept failing; rejected: can never succeed), deliveries,
    /// when, and the last error the service noted.
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// Include dead letters already replayed.
        #[arg(long)]
        include_replayed: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters again to the queue they came from and mark them replayed. Fix the
    /// cause first. The messages go through the outbox: a running worker or ingest
    /// publishes them within about a second. Idempotent: chunks already imported
    /// are skipped, and the tenant gets one email per file.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "tenant", "all"])))]
    Replay {
        /// One dead letter (its ID in `dead-letters list`).
        #[arg(long)]
        id: Option<i64>,
        /// Every dead letter of this tenant not yet replayed.
        #[arg(long)]
        tenant: Option<String>,
        /// Every dead letter not yet replayed.
        #[arg(long)]
        all: bool,
    },
}

impl DeadLettersCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            DeadLettersCmd::List {
                tenant,
                include_replayed,
                json,
            } => {
                let tenant_id = match tenant {
                    Some(slug) => Some(super::find(conn, &slug)?.id),
                    None => None,
                };
                let letters = deadletters::list(conn, tenant_id, include_replayed)?;
                if json {
                    serde_json::to_writer_pretty(&mut *out, &letters)?;
                    writeln!(out)?;
                } else {
                    write!(out, "{}", deadletters::render(&letters))?;
                }
            }
            DeadLettersCmd::Replay { id, tenant, all } => {
                let selection = match (id, tenant, all) {
                    (Some(id), _, _) => deadletters::Selection::Id(id),
                    (None, Some(slug), _) => {
                        deadletters::Selection::Tenant(super::find(conn, &slug)?.id)
                    }
                    (None, None, true) => deadletters::Selection::All,
                    (None, None, false) => bail!("say which: --id N, --tenant SLUG or --all"),
                };
                let done = deadletters::replay(conn, selection)?;
                if let (deadletters::Selection::Id(id), true, true) =
                    (selection, done.replayed.is_empty(), done.skipped.is_empty())
                {
                    bail!("no dead letter {id} (see `muictl dead-letters list`)");
                }
                for (id, why) in &done.skipped {
                    writeln!(out, "dead letter {id} skipped: {why}")?;
                }
                writeln!(
                    out,
                    "{} dead letter(s) replayed{}",
                    done.replayed.len(),
                    if done.replayed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({}); a running worker or ingest publishes them within about a second",
                            done.replayed
                                .iter()
                                .map(|i| i.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                )?;
            }
        }
        Ok(())
    }
}
