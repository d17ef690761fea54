//! `muictl queue`: the fair dispatcher as the operator sees it.

use std::io::Write;

use clap::Args;
use diesel::PgConnection;
use mui_shared::dispatch;

/// Who leads the dispatcher, the live workers, and the chunks waiting or in flight per file.
#[derive(Debug, Args)]
pub struct QueueCmd {
    /// JSON output.
    #[arg(long)]
    json: bool,
}

impl QueueCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        let o = dispatch::overview(conn)?;
        if self.json {
            serde_json::to_writer_pretty(&mut *out, &o)?;
            writeln!(out)?;
            return Ok(());
        }
        match &o.leader {
            Some(l) => writeln!(out, "dispatcher: {l}")?,
            None => writeln!(
                out,
                "dispatcher: nobody leads (no worker with DISPATCH=true is connected)"
            )?,
        }
        writeln!(
            out,
            "\n{:<48} {:>11} {:>9}",
            "WORKER", "CONCURRENCY", "SEEN"
        )?;
        if o.workers.is_empty() {
            writeln!(out, "(no worker seen in the last minute)")?;
        }
        for w in &o.workers {
            writeln!(
                out,
                "{:<48} {:>11} {:>7}s ago",
                w.name, w.concurrency, w.seen_secs_ago
            )?;
        }
        writeln!(
            out,
            "\n{:<20} {:>8} {:<28} {:>8} {:>9} {:>5} {:>5}",
            "TENANT", "FILE", "NAME", "WAITING", "IN FLIGHT", "DEAD", "HELD"
        )?;
        if o.files.is_empty() {
            writeln!(out, "(the chunk queue is empty)")?;
        }
        for f in &o.files {
            writeln!(
                out,
                "{:<20} {:>8} {:<28} {:>8} {:>9} {:>5} {:>5}",
                f.tenant, f.file_id, f.file_name, f.waiting, f.in_flight, f.dead, f.held
            )?;
        }
        Ok(())
    }
}
