//! `muictl`: the operator's command line. Talks to PostgreSQL only (DATABASE_URL).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use diesel::prelude::*;
use mui_shared::deadletters;
use mui_shared::domain::{ImportFileId, TenantSlug};
use mui_shared::schema::{import_files, permits, users};
use mui_shared::tenants::{self, SettingsChange, Tenant};

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
}

#[derive(Debug, Subcommand)]
enum DeadLettersCmd {
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

#[derive(Debug, Subcommand)]
enum PermitCmd {
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

#[derive(Debug, Subcommand)]
enum TenantCmd {
    /// Create a tenant; its drop folder is DROP_ROOT/SLUG/upload.
    Create {
        /// Drop folder and SFTP account name: lowercase letter first, then a-z, 0-9, '-', '_'.
        slug: String,
        /// Display name (default: the slug).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Also create the drop folder under this DROP_ROOT.
        #[arg(long, env = "DROP_ROOT")]
        drop_root: Option<PathBuf>,
    },
    /// Change a tenant's settings.
    Set {
        /// The tenant.
        slug: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// List tenants.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one tenant with its login sources and user types.
    Show {
        /// The tenant.
        slug: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct SettingsArgs {
    /// Reply-to Admin Email Address: the sender of failure reports.
    #[arg(long)]
    reply_to: Option<String>,
    /// Failed Import Email: recipient of failure reports (repeat for several; replaces the list).
    #[arg(long = "failed-import-email")]
    failed_import_emails: Vec<String>,
    /// Archive users imported with active=0 (on|off): `_YEAR` is appended to their
    /// identifying fields and their active permits are released.
    #[arg(long, value_parser = parse_on_off)]
    archive_on_inactive: Option<bool>,
    /// Fields that get the `_YEAR` suffix on archive, comma-separated (default
    /// last_name,user_name,email).
    #[arg(long, value_delimiter = ',')]
    archive_fields: Option<Vec<String>>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

#[derive(Debug, Subcommand)]
enum LoginSourceCmd {
    /// Add login sources to a tenant.
    Add {
        /// The tenant.
        slug: String,
        /// Login source names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum UserTypeCmd {
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

#[derive(Debug, Subcommand)]
enum FilesCmd {
    /// A tenant's files, newest first: state, progress and counts.
    List {
        /// The tenant.
        slug: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// How many files.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Print a file's failures CSV (the email's attachment) again.
    Failures {
        /// The file id (from `files list`).
        file_id: i64,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCmd {
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
    let out = &mut std::io::stdout().lock();
    match cli.command {
        Command::Migrate => {
            let applied = mui_shared::db::migrate(conn)?;
            writeln!(out, "{} migration(s) applied", applied.len())?;
        }
        Command::Tenant(TenantCmd::Create {
            slug,
            name,
            settings,
            drop_root,
        }) => {
            let slug = TenantSlug::parse(&slug)?;
            if tenants::find_by_slug(conn, slug.as_str())?.is_some() {
                bail!("tenant {slug} already exists (use `muictl tenant set`)");
            }
            let t = conn.transaction(|conn| {
                let t = tenants::create(conn, &slug, name.as_deref().unwrap_or(slug.as_str()))?;
                apply(conn, &t, None, &settings)
            })?;
            if let Some(root) = drop_root {
                let dir = tenants::drop_folder(&root, slug.as_str());
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating drop folder {}", dir.display()))?;
                writeln!(out, "drop folder: {}", dir.display())?;
            }
            print_tenant(out, conn, &t, false)?;
        }
        Command::Tenant(TenantCmd::Set {
            slug,
            name,
            settings,
        }) => {
            let t = find(conn, &slug)?;
            let t = apply(conn, &t, name, &settings)?;
            print_tenant(out, conn, &t, false)?;
        }
        Command::Tenant(TenantCmd::List { json }) => {
            let list = tenants::list(conn)?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &list)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{:<24} {:<8} {:<8} NAME", "SLUG", "MAIL", "ARCHIVE")?;
                for t in list {
                    let mail = if t.missing_mail_settings().is_none() {
                        "ok"
                    } else {
                        "MISSING"
                    };
                    let archive = if t.archive_on_inactive { "on" } else { "off" };
                    writeln!(out, "{:<24} {:<8} {:<8} {}", t.slug, mail, archive, t.name)?;
                }
            }
        }
        Command::Tenant(TenantCmd::Show { slug, json }) => {
            let t = find(conn, &slug)?;
            print_tenant(out, conn, &t, json)?;
            if !json {
                print_folder_status(out, conn, &t)?;
            }
        }
        Command::LoginSource(LoginSourceCmd::Add { slug, names }) => {
            let t = find(conn, &slug)?;
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
        Command::UserType(UserTypeCmd::Add {
            slug,
            type_id,
            name,
        }) => {
            let t = find(conn, &slug)?;
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
        Command::Files(FilesCmd::List { slug, json, limit }) => {
            let t = find(conn, &slug)?;
            list_files(out, conn, &t, json, limit)?;
        }
        Command::DeadLetters(DeadLettersCmd::List {
            tenant,
            include_replayed,
            json,
        }) => {
            let tenant_id = match tenant {
                Some(slug) => Some(find(conn, &slug)?.id),
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
        Command::DeadLetters(DeadLettersCmd::Replay { id, tenant, all }) => {
            let selection = match (id, tenant, all) {
                (Some(id), _, _) => deadletters::Selection::Id(id),
                (None, Some(slug), _) => deadletters::Selection::Tenant(find(conn, &slug)?.id),
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
        Command::Files(FilesCmd::Failures { file_id }) => {
            let (name, header): (String, Option<serde_json::Value>) = import_files::table
                .find(file_id)
                .select((import_files::file_name, import_files::header))
                .first(conn)
                .optional()?
                .with_context(|| format!("no file with id {file_id}"))?;
            let header: Vec<String> = header
                .and_then(|h| serde_json::from_value(h).ok())
                .unwrap_or_default();
            let failures = mui_notifier::load_failures(conn, ImportFileId(file_id), i64::MAX)?;
            let csv = mui_notifier::report::failures_csv(&header, &failures)?;
            out.write_all(&csv)?;
            eprintln!("{} failed row(s) of {name:?}", failures.len());
        }
        Command::Permit(PermitCmd::Add {
            slug,
            unique_id,
            permit_number,
            lot,
            window,
        }) => {
            let t = find(conn, &slug)?;
            let exists: i64 = users::table
                .filter(
                    users::tenant_id
                        .eq(t.id)
                        .and(users::unique_id.eq(&unique_id)),
                )
                .count()
                .get_result(conn)?;
            if exists == 0 {
                bail!("tenant {} has no user {unique_id:?}", t.slug);
            }
            diesel::insert_into(permits::table)
                .values((
                    permits::tenant_id.eq(t.id),
                    permits::unique_id.eq(&unique_id),
                    permits::permit_number.eq(&permit_number),
                    permits::lot_name.eq(&lot),
                    permits::active_window.eq(&window),
                ))
                .execute(conn)
                .with_context(|| {
                    format!("permit {permit_number:?} (permit numbers are unique within a tenant)")
                })?;
            writeln!(out, "permit {permit_number} ({lot}) given to {unique_id}")?;
        }
        Command::Permit(PermitCmd::List { slug, user, json }) => {
            let t = find(conn, &slug)?;
            let mut q = permits::table
                .filter(permits::tenant_id.eq(t.id))
                .into_boxed();
            if let Some(u) = &user {
                q = q.filter(permits::unique_id.eq(u));
            }
            type PermitLine = (
                String,
                String,
                String,
                Option<String>,
                String,
                Option<chrono::DateTime<chrono::Utc>>,
            );
            let rows: Vec<PermitLine> = q
                .order((permits::unique_id, permits::permit_number))
                .select((
                    permits::permit_number,
                    permits::unique_id,
                    permits::lot_name,
                    permits::active_window,
                    permits::state,
                    permits::released_at,
                ))
                .load(conn)?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| serde_json::json!({"permit_number": r.0, "unique_id": r.1, "lot_name": r.2, "active_window": r.3, "state": r.4, "released_at": r.5}))
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
                        r.0,
                        r.1,
                        r.2,
                        r.4,
                        r.5.map(|d| d.format("%Y-%m-%d").to_string())
                            .unwrap_or_default()
                    )?;
                }
            }
        }
        Command::Users(UsersCmd::List { slug, json, limit }) => {
            let t = find(conn, &slug)?;
            type UserLine = (
                String,
                String,
                Option<String>,
                Option<String>,
                Option<String>,
                bool,
                Option<chrono::DateTime<chrono::Utc>>,
            );
            let rows: Vec<UserLine> = users::table
                .filter(users::tenant_id.eq(t.id))
                .order(users::unique_id)
                .limit(limit)
                .select((
                    users::unique_id,
                    users::login_source,
                    users::first_name,
                    users::last_name,
                    users::email,
                    users::active,
                    users::archived_at,
                ))
                .load(conn)?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| serde_json::json!({"unique_id": r.0, "login_source": r.1, "first_name": r.2, "last_name": r.3, "email": r.4, "active": r.5, "archived_at": r.6}))
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
                    let name = format!("{} {}", r.2.unwrap_or_default(), r.3.unwrap_or_default());
                    let archived =
                        r.6.map(|d| d.format("%Y-%m-%d").to_string())
                            .unwrap_or_default();
                    writeln!(
                        out,
                        "{:<20} {:<12} {:<30} {:<32} {:<6} {}",
                        r.0,
                        r.1,
                        name.trim(),
                        r.4.unwrap_or_default(),
                        if r.5 { 1 } else { 0 },
                        archived
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn find(conn: &mut PgConnection, slug: &str) -> anyhow::Result<Tenant> {
    tenants::find_by_slug(conn, slug)?
        .with_context(|| format!("no tenant {slug:?} (see `muictl tenant list`)"))
}

fn apply(
    conn: &mut PgConnection,
    t: &Tenant,
    name: Option<String>,
    s: &SettingsArgs,
) -> anyhow::Result<Tenant> {
    for addr in s.reply_to.iter().chain(s.failed_import_emails.iter()) {
        if !addr.trim().is_empty() && !email_address::EmailAddress::is_valid(addr.trim()) {
            bail!("{addr:?} is not an email address");
        }
    }
    let change = SettingsChange {
        name,
        reply_to_email: s
            .reply_to
            .as_ref()
            .map(|r| Some(r.trim().to_owned()).filter(|r| !r.is_empty())),
        failed_import_emails: (!s.failed_import_emails.is_empty()).then(|| {
            s.failed_import_emails
                .iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect()
        }),
        archive_on_inactive: s.archive_on_inactive,
        archive_suffix_fields: match &s.archive_fields {
            None => None,
            Some(fields) => Some(archive_fields(fields)?),
        },
    };
    if change.name.is_none()
        && change.reply_to_email.is_none()
        && change.failed_import_emails.is_none()
        && change.archive_on_inactive.is_none()
        && change.archive_suffix_fields.is_none()
    {
        return Ok(t.clone());
    }
    Ok(tenants::update(conn, t.tenant_id(), &change)?)
}

/// Checks the fields named for the archive suffix: text columns other than the key fields.
fn archive_fields(fields: &[String]) -> anyhow::Result<Vec<String>> {
    use mui_shared::domain::Column;
    let mut out = Vec::new();
    for f in fields.iter().map(|f| f.trim()).filter(|f| !f.is_empty()) {
        match Column::from_header(f) {
            Some(Column::UniqueId | Column::LoginSource | Column::DateOfBirth | Column::Active)
            | None => bail!(
                "{f:?} cannot take an archive suffix; use text columns such as last_name, user_name, email"
            ),
            Some(c) => out.push(c.name().to_owned()),
        }
    }
    Ok(out)
}

fn print_tenant(
    out: &mut impl Write,
    conn: &mut PgConnection,
    t: &Tenant,
    json: bool,
) -> anyhow::Result<()> {
    let sources = tenants::login_sources_of(conn, t.tenant_id())?;
    let types = tenants::user_types_of(conn, t.tenant_id())?;
    if json {
        let v = serde_json::json!({"tenant": t, "login_sources": sources, "user_types": types});
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "tenant:               {} ({})", t.slug, t.name)?;
    writeln!(
        out,
        "reply-to:             {}",
        t.reply_to_email.as_deref().unwrap_or("(not set)")
    )?;
    writeln!(
        out,
        "failed import email:  {}",
        if t.failed_import_emails.is_empty() {
            "(not set)".to_owned()
        } else {
            t.failed_import_emails.join(", ")
        }
    )?;
    writeln!(
        out,
        "archive on inactive:  {}",
        if t.archive_on_inactive { "on" } else { "off" }
    )?;
    writeln!(
        out,
        "archive suffix on:    {}",
        t.archive_suffix_fields.join(", ")
    )?;
    writeln!(
        out,
        "login sources:        {}",
        if sources.is_empty() {
            "(none)".to_owned()
        } else {
            sources.join(", ")
        }
    )?;
    writeln!(
        out,
        "user types:           {}",
        if types.is_empty() {
            "(none)".to_owned()
        } else {
            types.join(", ")
        }
    )?;
    if let Some(why) = t.missing_mail_settings() {
        writeln!(
            out,
            "warning:              {why}: failure reports are kept but not mailed"
        )?;
    }
    Ok(())
}

#[derive(Queryable, serde::Serialize)]
struct FileLine {
    id: i64,
    file_name: String,
    state: String,
    rows_total: Option<i64>,
    total_chunks: Option<i32>,
    chunks_done: i32,
    rows_inserted: i64,
    rows_updated: i64,
    rows_unchanged: i64,
    rows_failed: i64,
    users_archived: i64,
    users_reactivated: i64,
    permits_released: i64,
    error_code: Option<String>,
    error_message: Option<String>,
    archived_name: Option<String>,
    notify_status: String,
    notify_detail: Option<String>,
    received_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    notices: Vec<String>,
}

/// What ingest last found in the tenant's drop folder.
fn print_folder_status(
    out: &mut impl Write,
    conn: &mut PgConnection,
    t: &Tenant,
) -> anyhow::Result<()> {
    use mui_shared::schema::drop_folder_status as dfs;
    let status: Option<(String, Option<String>, chrono::DateTime<chrono::Utc>)> = dfs::table
        .find(t.id)
        .select((dfs::path, dfs::problem, dfs::since))
        .first(conn)
        .optional()?;
    match status {
        None => writeln!(out, "drop folder: not looked at by ingest yet")?,
        Some((path, None, since)) => writeln!(
            out,
            "drop folder: {path} (readable since {})",
            since.format("%Y-%m-%d %H:%M:%S")
        )?,
        Some((_, Some(problem), since)) => writeln!(
            out,
            "drop folder: PROBLEM since {}: {problem}",
            since.format("%Y-%m-%d %H:%M:%S")
        )?,
    }
    Ok(())
}

fn list_files(
    out: &mut impl Write,
    conn: &mut PgConnection,
    t: &Tenant,
    json: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let files: Vec<FileLine> = import_files::table
        .filter(import_files::tenant_id.eq(t.id))
        .order(import_files::id.desc())
        .limit(limit)
        .select((
            import_files::id,
            import_files::file_name,
            import_files::state,
            import_files::rows_total,
            import_files::total_chunks,
            import_files::chunks_done,
            import_files::rows_inserted,
            import_files::rows_updated,
            import_files::rows_unchanged,
            import_files::rows_failed,
            import_files::users_archived,
            import_files::users_reactivated,
            import_files::permits_released,
            import_files::error_code,
            import_files::error_message,
            import_files::archived_name,
            import_files::notify_status,
            import_files::notify_detail,
            import_files::received_at,
            import_files::finished_at,
            import_files::notices,
        ))
        .load(conn)?;
    let dead = deadletters::pending_by_file(conn, t.id)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &files)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>6} {:<28} {:<10} {:>9} {:>9} {:>7} {:<11} RECEIVED",
        "ID", "FILE", "STATE", "ROWS", "IMPORTED", "FAILED", "EMAIL"
    )?;
    for f in files {
        let imported = f.rows_inserted + f.rows_updated + f.rows_unchanged;
        let rows = match (f.state.as_str(), f.rows_total) {
            (_, Some(n)) => n.to_string(),
            ("failed", None) => "-".to_owned(),
            _ => "?".to_owned(),
        };
        let state = if f.state == "importing" || (f.state == "received" && f.chunks_done > 0) {
            format!(
                "{} {}/{}",
                f.state,
                f.chunks_done,
                f.total_chunks.map_or("?".to_owned(), |n| n.to_string())
            )
        } else {
            f.state.clone()
        };
        let dead_letters = dead.get(&f.id).copied().unwrap_or(0);
        let state = if dead_letters > 0 && f.state != "done" {
            "dead-lettered".to_owned()
        } else {
            state
        };
        writeln!(
            out,
            "{:>6} {:<28} {:<10} {:>9} {:>9} {:>7} {:<11} {}",
            f.id,
            mui_shared::messages::truncate_for_message(&f.file_name, 27),
            state,
            rows,
            imported,
            f.rows_failed,
            f.notify_status,
            f.received_at.format("%Y-%m-%d %H:%M:%S")
        )?;
        if f.users_archived + f.users_reactivated + f.permits_released > 0 {
            writeln!(
                out,
                "{:>6} archived {} user(s), reactivated {}, released {} permit(s)",
                "", f.users_archived, f.users_reactivated, f.permits_released
            )?;
        }
        if let Some(msg) = f.error_message {
            writeln!(out, "{:>6} error: {}", "", msg)?;
        }
        if let Some(detail) = f.notify_detail {
            writeln!(out, "{:>6} email: {}", "", detail)?;
        }
        for notice in &f.notices {
            writeln!(out, "{:>6} notice: {}", "", notice)?;
        }
        if dead_letters > 0 {
            writeln!(
                out,
                "{:>6} {} dead-lettered message(s): see `muictl dead-letters list --tenant {}`",
                "", dead_letters, t.slug
            )?;
        }
    }
    Ok(())
}
