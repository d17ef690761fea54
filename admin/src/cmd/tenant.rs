//! `muictl tenant`: tenants and their settings.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use diesel::prelude::*;
use mui_shared::domain::TenantSlug;
use mui_shared::tenants::{self, SettingsChange, Tenant};

use super::find;

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
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
pub struct SettingsArgs {
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
    /// Mass-deactivation guard: hold a file that would deactivate or archive more than this
    /// percentage of the tenant's active users (and more than --guard-min-users) until an
    /// operator approves it; 0 switches the guard off (default 10).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
    guard_percent: Option<i32>,
    /// Mass-deactivation guard: ... and more than this many users (default 25).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    guard_min_users: Option<i32>,
    /// Mail a short report also when a file imported with no failures (on|off; default off).
    #[arg(long, value_parser = parse_on_off)]
    success_mail: Option<bool>,
    /// The tenant's own header name for one of our columns, as `"Their Name=column"`
    /// (e.g. `--header "Employee ID=unique_id"`); repeat for several. Replaces the map;
    /// `--header ""` clears it.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The tenant's country, a two-letter code (cz, pl, ru, tr, gr...): a file that is not
    /// UTF-8 is read in the encoding Excel writes there when its text alone is ambiguous.
    /// Default (and `--region ""`): Western Europe and the Americas, Windows-1252.
    #[arg(long)]
    region: Option<String>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

impl TenantCmd {
    pub fn run(self, conn: &mut PgConnection, out: &mut impl Write) -> anyhow::Result<()> {
        match self {
            TenantCmd::Create {
                slug,
                name,
                settings,
                drop_root,
            } => {
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
            TenantCmd::Set {
                slug,
                name,
                settings,
            } => {
                let t = find(conn, &slug)?;
                let t = apply(conn, &t, name, &settings)?;
                print_tenant(out, conn, &t, false)?;
            }
            TenantCmd::List { json } => {
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
            TenantCmd::Show { slug, json } => {
                let t = find(conn, &slug)?;
                print_tenant(out, conn, &t, json)?;
                if !json {
                    print_folder_status(out, conn, &t)?;
                }
            }
        }
        Ok(())
    }
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
        guard_percent: s.guard_percent,
        guard_min_users: s.guard_min_users,
        success_mail: s.success_mail,
        header_aliases: if s.headers.is_empty() {
            None
        } else {
            Some(header_aliases(&s.headers)?)
        },
        region: match s.region.as_deref().map(str::trim) {
            None => None,
            Some("") => Some(None),
            Some(r) => Some(Some(tenants::parse_region(r).map_err(anyhow::Error::msg)?)),
        },
    };
    if change.is_empty() {
        return Ok(t.clone());
    }
    Ok(tenants::update(conn, t.tenant_id(), &change)?)
}

/// Parses `--header "Their Name=column"` settings into the stored map (their name, normalised
/// as headers are matched, to our column's name).
fn header_aliases(pairs: &[String]) -> anyhow::Result<serde_json::Value> {
    use mui_shared::domain::{normalise_header, Column};
    let mut map = serde_json::Map::new();
    for pair in pairs.iter().filter(|p| !p.trim().is_empty()) {
        let Some((theirs, ours)) = pair.rsplit_once('=') else {
            bail!(
                "--header {pair:?}: expected \"Their Name=column\", e.g. \"Employee ID=unique_id\""
            );
        };
        let Some(col) = Column::from_header(ours) else {
            bail!("--header {pair:?}: {:?} is not one of our columns (unique_id, login_source, first_name, ...)", ours.trim());
        };
        let key = normalise_header(theirs);
        if key.is_empty() {
            bail!("--header {pair:?}: the tenant's header name is empty");
        }
        if Column::from_header(theirs).is_some_and(|c| c != col) {
            bail!(
                "--header {pair:?}: {:?} is already our name for another column",
                theirs.trim()
            );
        }
        if map.insert(key, col.name().into()).is_some() {
            bail!("--header {pair:?}: {:?} is mapped twice", theirs.trim());
        }
    }
    Ok(serde_json::Value::Object(map))
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
        "deactivation guard:   {}",
        if t.guard_percent == 0 {
            "off".to_owned()
        } else {
            format!(
                "hold a file deactivating more than {}% of active users and more than {} users",
                t.guard_percent, t.guard_min_users
            )
        }
    )?;
    writeln!(
        out,
        "success mail:         {}",
        if t.success_mail { "on" } else { "off" }
    )?;
    writeln!(
        out,
        "region:               {}",
        t.region
            .as_deref()
            .unwrap_or("(none: Western Europe and the Americas, Windows-1252)")
    )?;
    let aliases = tenants::header_aliases(t);
    writeln!(
        out,
        "header names:         {}",
        if aliases.is_empty() {
            "(ours only)".to_owned()
        } else {
            aliases
                .iter()
                .map(|(k, c)| format!("{k} = {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
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
