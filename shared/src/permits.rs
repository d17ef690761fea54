//! Users' parking permits, as an operator lists and adds them (`muictl permit`). The import
//! never creates permits; it releases them when it archives a user.

use diesel::prelude::*;

use crate::domain::TenantId;
use crate::schema::permits;

/// One permit as an operator's list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct PermitLine {
    /// Permit number, unique within the tenant.
    pub permit_number: String,
    /// The holder's `unique_id`.
    pub unique_id: String,
    /// Lot name.
    pub lot_name: String,
    /// Active window (e.g. "O: Perm").
    pub active_window: Option<String>,
    /// `active` or `released`.
    pub state: String,
    /// When it was released, if it was.
    pub released_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A tenant's permits (only `user`'s, if given), by holder then number.
pub fn list_permit_lines(
    conn: &mut PgConnection,
    tenant: TenantId,
    user: Option<&str>,
) -> QueryResult<Vec<PermitLine>> {
    let mut q = permits::table
        .filter(permits::tenant_id.eq(tenant.0))
        .into_boxed();
    if let Some(u) = user {
        q = q.filter(permits::unique_id.eq(u));
    }
    q.order((permits::unique_id, permits::permit_number))
        .select((
            permits::permit_number,
            permits::unique_id,
            permits::lot_name,
            permits::active_window,
            permits::state,
            permits::released_at,
        ))
        .load(conn)
}

/// A permit to give a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewPermit<'a> {
    /// The tenant.
    pub tenant: TenantId,
    /// The holder's `unique_id`; the tenant must have this user.
    pub unique_id: &'a str,
    /// Permit number, unique within the tenant.
    pub permit_number: &'a str,
    /// Lot name.
    pub lot_name: &'a str,
    /// Active window (e.g. "O: Perm").
    pub active_window: Option<&'a str>,
}

/// Why a permit was not added.
#[derive(Debug, thiserror::Error)]
pub enum AddPermitError {
    /// The tenant has no user with that `unique_id`.
    #[error("the tenant has no such user")]
    NoSuchUser,
    /// Looking the user up failed.
    #[error("looking up the user")]
    Lookup(#[source] diesel::result::Error),
    /// Storing the permit failed (e.g. its number is taken within the tenant).
    #[error("storing the permit (permit numbers are unique within a tenant)")]
    Insert(#[source] diesel::result::Error),
}

/// Gives a user of the tenant an active permit.
pub fn add_permit(conn: &mut PgConnection, permit: &NewPermit<'_>) -> Result<(), AddPermitError> {
    if !crate::users::user_exists(conn, permit.tenant, permit.unique_id)
        .map_err(AddPermitError::Lookup)?
    {
        return Err(AddPermitError::NoSuchUser);
    }
    diesel::insert_into(permits::table)
        .values((
            permits::tenant_id.eq(permit.tenant.0),
            permits::unique_id.eq(permit.unique_id),
            permits::permit_number.eq(permit.permit_number),
            permits::lot_name.eq(permit.lot_name),
            permits::active_window.eq(permit.active_window),
        ))
        .execute(conn)
        .map_err(AddPermitError::Insert)?;
    Ok(())
}
