//! A tenant's users, as an operator looks them up (`muictl users list`, `muictl permit add`).

use diesel::prelude::*;

use crate::domain::TenantId;
use crate::schema::users;

/// One user as an operator's list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct UserLine {
    /// The user's `unique_id`.
    pub unique_id: String,
    /// Login source (SSO) name.
    pub login_source: String,
    /// First name.
    pub first_name: Option<String>,
    /// Last name (with the archive suffix, if archived).
    pub last_name: Option<String>,
    /// Email (with the archive suffix, if archived and so configured).
    pub email: Option<String>,
    /// Active flag as last imported.
    pub active: bool,
    /// When the user was archived, if archived.
    pub archived_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A tenant's first `limit` users, by `unique_id`.
pub fn list_user_lines(
    conn: &mut PgConnection,
    tenant: TenantId,
    limit: i64,
) -> QueryResult<Vec<UserLine>> {
    users::table
        .filter(users::tenant_id.eq(tenant.0))
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
        .load(conn)
}

/// Whether the tenant has a user with this `unique_id`.
pub fn user_exists(
    conn: &mut PgConnection,
    tenant: TenantId,
    unique_id: &str,
) -> QueryResult<bool> {
    let n: i64 = users::table
        .filter(
            users::tenant_id
                .eq(tenant.0)
                .and(users::unique_id.eq(unique_id)),
        )
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}
