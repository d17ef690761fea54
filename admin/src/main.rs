//! `muictl`: the operator's command line. Talks to PostgreSQL only (DATABASE_URL).
//!
//! One module per command group in [`cmd`]; the queries live in `mui_shared`, so a web
//! console can run the same ones.

mod cmd;
mod terminal;

use anyhow::Context;
use clap::{Parser, Subcommand};
use diesel::prelude::*;
use std::io::{IsTerminal, Write};

use cmd::dead_letters::DeadLettersCmd;
use cmd::files::FilesCmd;
use cmd::login_source::LoginSourceCmd;
use cmd::permit::PermitCmd;
use cmd::tenant::TenantCmd;
use cmd::user_type::UserTypeCmd;
use cmd::users::UsersCmd;

/// Operate Managed User Import: tenants and their settings, login sources and user types,
/// the files each tenant sent and their failure reports, dead letters and their replay.
///
/// Connects to DATABASE_URL (MUI_CONFIG_FILE may name a file of KEY=value lines read first).
#[derive(Debug, Parser)]
#[command(name = "muictl", version)]
struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/mui",
        global = true
    )]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations (the services also do this at start; safe to run
    /// while they start).
    Migrate,
    /// Tenants and their settings.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// A tenant's login sources (SSO), which rows' `login_source` must name.
    #[command(subcommand)]
    LoginSource(LoginSourceCmd),
    /// A tenant's user types, which rows' `user_type_id` must name.
    #[command(subcommand)]
    UserType(UserTypeCmd),
    /// The files a tenant sent, their state and counts.
    #[command(subcommand)]
    Files(FilesCmd),
    /// A tenant's users (for checks and demos).
    #[command(subcommand)]
    Users(UsersCmd),
    /// Users' parking permits (the import never creates permits; it releases them when it
    /// archives a user).
    #[command(subcommand)]
    Permit(PermitCmd),
    /// Messages RabbitMQ dead-lettered (a chunk or report that kept failing or could never
    /// be handled), and replaying them after the cause is fixed.
    #[command(subcommand)]
    DeadLetters(DeadLettersCmd),
    /// The fair dispatcher: who leads, the live workers, and each file's chunks waiting, in
    /// flight or dead-lettered.
    Queue(cmd::queue::QueueCmd),
}

fn main() -> std::process::ExitCode {
    if let Err(e) = mui_shared::config::load_config_file() {
        eprintln!("muictl: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muictl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut conn = PgConnection::establish(&cli.database_url).with_context(|| {
        format!(
            "connecting to {}",
            mui_shared::config::redact_url(&cli.database_url)
        )
    })?;
    let conn = &mut conn;
    if !matches!(cli.command, Command::Migrate) {
        // Every command needs the schema; applying it is idempotent and locked.
        mui_shared::db::migrate(conn)?;
    }
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        dispatch(
            cli.command,
            conn,
            &mut terminal::TerminalSafe::new(stdout.lock()),
        )
    } else {
        dispatch(cli.command, conn, &mut stdout.lock())
    }
}

/// Runs `command`, writing to `out`.
fn dispatch(command: Command, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        Command::Migrate => cmd::migrate::run(conn, out),
        Command::Tenant(c) => c.run(conn, out),
        Command::LoginSource(c) => c.run(conn, out),
        Command::UserType(c) => c.run(conn, out),
        Command::Files(c) => c.run(conn, out),
        Command::Users(c) => c.run(conn, out),
        Command::Permit(c) => c.run(conn, out),
        Command::DeadLetters(c) => c.run(conn, out),
        Command::Queue(c) => c.run(conn, out),
    }
}
