//! Tenants and their settings, as stored and as the services read them.

use diesel::prelude::*;

use crate::domain::{TenantId, TenantSlug};
use crate::schema::{login_sources, tenants, user_types};

/// A tenant and its settings.
#[derive(Debug, Clone, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = tenants)]
pub struct Tenant {
    /// Database id.
    pub id: i64,
    /// Drop folder name.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Reply-to Admin Email Address: sender of reports.
    pub reply_to_email: Option<String>,
    /// Failed Import Email: recipients of reports.
    pub failed_import_emails: Vec<String>,
    /// Archive users imported with `active=0`.
    pub archive_on_inactive: bool,
    /// When the tenant was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Fields that get the `_YEAR` suffix when a user is archived.
    pub archive_suffix_fields: Vec<String>,
    /// Mass-deactivation guard: share of the active users, percent (0: off).
    pub guard_percent: i32,
    /// Mass-deactivation guard: minimum number of users.
    pub guard_min_users: i32,
    /// Mail a short report also when a file imported with no failures.
    pub success_mail: bool,
    /// The tenant's own header names for our columns (`{"employee_id": "unique_id"}`).
    pub header_aliases: serde_json::Value,
    /// The tenant's country (`cz`, `pl`, `ru`), the encoding detector's hint for files that
    /// are not UTF-8 (see [`parse_region`]); `None`: Western Europe and the Americas.
    pub region: Option<String>,
}

impl Tenant {
    /// Typed id.
    pub fn tenant_id(&self) -> TenantId {
        TenantId(self.id)
    }

    /// Why reports cannot be mailed for this tenant, if they cannot.
    pub fn missing_mail_settings(&self) -> Option<String> {
        let mut missing = Vec::new();
        if self
            .reply_to_email
            .as_deref()
            .is_none_or(|s| s.trim().is_empty())
        {
            missing.push("Reply-to Admin Email Address");
        }
        if self.failed_import_emails.is_empty() {
            missing.push("Failed Import Email");
        }
        if missing.is_empty() {
            None
        } else {
            Some(format!("tenant has no {}", missing.join(" and no ")))
        }
    }
}

/// Looks a tenant up by slug.
pub fn find_by_slug(conn: &mut PgConnection, slug: &str) -> QueryResult<Option<Tenant>> {
    tenants::table
        .filter(tenants::slug.eq(slug))
        .select(Tenant::as_select())
        .first(conn)
        .optional()
}

/// Looks a tenant up by id.
pub fn find(conn: &mut PgConnection, id: TenantId) -> QueryResult<Option<Tenant>> {
    tenants::table
        .find(id.0)
        .select(Tenant::as_select())
        .first(conn)
        .optional()
}

/// Every tenant, by slug.
pub fn list(conn: &mut PgConnection) -> QueryResult<Vec<Tenant>> {
    tenants::table
        .order(tenants::slug)
        .select(Tenant::as_select())
        .load(conn)
}

/// Creates a tenant.
pub fn create(conn: &mut PgConnection, slug: &TenantSlug, name: &str) -> QueryResult<Tenant> {
    diesel::insert_into(tenants::table)
        .values((tenants::slug.eq(slug.as_str()), tenants::name.eq(name)))
        .returning(Tenant::as_returning())
        .get_result(conn)
}

/// Settings to change; `None` leaves a setting as it is.
#[derive(Debug, Default, Clone, AsChangeset)]
#[diesel(table_name = tenants)]
pub struct SettingsChange {
    /// New display name.
    pub name: Option<String>,
    /// New sender (Some(None) clears it).
    pub reply_to_email: Option<Option<String>>,
    /// New recipients.
    pub failed_import_emails: Option<Vec<String>>,
    /// New archive-on-inactive setting.
    pub archive_on_inactive: Option<bool>,
    /// New list of fields suffixed on archive.
    pub archive_suffix_fields: Option<Vec<String>>,
    /// New guard share, percent (0: off).
    pub guard_percent: Option<i32>,
    /// New guard minimum.
    pub guard_min_users: Option<i32>,
    /// New success-mail setting.
    pub success_mail: Option<bool>,
    /// New header names (replaces the map).
    pub header_aliases: Option<serde_json::Value>,
    /// New region (Some(None) clears it).
    pub region: Option<Option<String>>,
}

impl SettingsChange {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.reply_to_email.is_none()
            && self.failed_import_emails.is_none()
            && self.archive_on_inactive.is_none()
            && self.archive_suffix_fields.is_none()
            && self.guard_percent.is_none()
            && self.guard_min_users.is_none()
            && self.success_mail.is_none()
            && self.header_aliases.is_none()
            && self.region.is_none()
    }
}

/// Reads a tenant's region: a two-letter country code (ISO 3166, as in its internet domain:
/// `cz`, `pl`, `ru`, `tr`), any case. The encoding detector takes it as its hint for a file
/// that is not UTF-8: the code page Excel writes in that country wins when the text alone is
/// ambiguous (a one-line file with `Þór` is Windows-1252 in Iceland and Windows-1250's `Ţór`
/// in Romania).
pub fn parse_region(s: &str) -> Result<String, String> {
    let r = s.trim().to_ascii_lowercase();
    if is_region(&r) {
        Ok(r)
    } else {
        Err(format!(
            "a region is a two-letter country code such as cz, pl or ru, not {s:?}"
        ))
    }
}

/// Whether `r` is a region as stored: two lowercase ASCII letters (the database checks the
/// same).
pub fn is_region(r: &str) -> bool {
    r.len() == 2 && r.bytes().all(|b| b.is_ascii_lowercase())
}

/// The tenant's own header names, normalised (`normalise_header`), each with the column it
/// stands for.
pub fn header_aliases(t: &Tenant) -> Vec<(String, crate::domain::Column)> {
    let mut out = Vec::new();
    if let Some(map) = t.header_aliases.as_object() {
        for (k, v) in map {
            if let Some(col) = v.as_str().and_then(crate::domain::Column::from_header) {
                out.push((crate::domain::normalise_header(k), col));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Applies a settings change.
pub fn update(
    conn: &mut PgConnection,
    id: TenantId,
    change: &SettingsChange,
) -> QueryResult<Tenant> {
    diesel::update(tenants::table.find(id.0))
        .set(change)
        .returning(Tenant::as_returning())
        .get_result(conn)
}

/// Adds a login source (SSO) to a tenant; adding an existing one is a no-op.
pub fn add_login_source(conn: &mut PgConnection, id: TenantId, name: &str) -> QueryResult<()> {
    diesel::insert_into(login_sources::table)
        .values((
            login_sources::tenant_id.eq(id.0),
            login_sources::name.eq(name),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(())
}

/// Adds (or renames) a user type of a tenant.
pub fn add_user_type(
    conn: &mut PgConnection,
    id: TenantId,
    type_id: &str,
    name: &str,
) -> QueryResult<()> {
    diesel::insert_into(user_types::table)
        .values((
            user_types::tenant_id.eq(id.0),
            user_types::type_id.eq(type_id),
            user_types::name.eq(name),
        ))
        .on_conflict((user_types::tenant_id, user_types::type_id))
        .do_update()
        .set(user_types::name.eq(name))
        .execute(conn)?;
    Ok(())
}

/// A tenant's login sources.
pub fn login_sources_of(conn: &mut PgConnection, id: TenantId) -> QueryResult<Vec<String>> {
    login_sources::table
        .filter(login_sources::tenant_id.eq(id.0))
        .order(login_sources::name)
        .select(login_sources::name)
        .load(conn)
}

/// A tenant's user type ids.
pub fn user_types_of(conn: &mut PgConnection, id: TenantId) -> QueryResult<Vec<String>> {
    user_types::table
        .filter(user_types::tenant_id.eq(id.0))
        .order(user_types::type_id)
        .select(user_types::type_id)
        .load(conn)
}

/// What ingest last found in a tenant's drop folder (`drop_folder_status`).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct FolderStatus {
    /// The folder's path on the SFTP host.
    pub path: String,
    /// What is wrong with it, if anything (the problem and its cause).
    pub problem: Option<String>,
    /// Since when it is so.
    pub since: chrono::DateTime<chrono::Utc>,
}

/// What ingest last found in a tenant's drop folder; `None` if ingest has not looked yet.
pub fn folder_status(conn: &mut PgConnection, id: TenantId) -> QueryResult<Option<FolderStatus>> {
    use crate::schema::drop_folder_status as dfs;
    dfs::table
        .find(id.0)
        .select((dfs::path, dfs::problem, dfs::since))
        .first(conn)
        .optional()
}

/// The folder a tenant drops files into: `DROP_ROOT/<slug>/upload/`. `DROP_ROOT/<slug>/` is
/// the tenant's SFTP chroot (root-owned, as OpenSSH requires), `upload/` the one folder the
/// tenant can write to, and `upload/bak/` where handled files go.
pub fn drop_folder(drop_root: &std::path::Path, slug: &str) -> std::path::PathBuf {
    drop_root.join(slug).join(DROP_SUBDIR)
}

/// The name of the drop folder inside a tenant's folder (see [`drop_folder`]).
pub const DROP_SUBDIR: &str = "upload";
