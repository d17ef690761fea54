//! Registrations whose content is gone. A file is registered before it is read; if the
//! ingest handling it dies and the tenant replaces or removes the file before an ingest
//! comes back, nothing will ever take that registration up again (its arrival key names an
//! inode and mtime no longer in the folder), and as its tenant's oldest open file it would
//! hold back every later file of the tenant. Each rescan ends such a registration as
//! `unreadable` through [`mui_shared::ending::end`] (what was queued of it before the crash is
//! kept and said so; never a mix of two versions: a replacement is a new upload of its own).
//!
//! A registration some ingest holds (its advisory lock) or that is younger than
//! [`MIN_AGE_SECS`] (registered, its lock not yet taken) is left alone, and so is one whose
//! content is still in the folder under any name: the next scan carries it on.

use super::*;
use diesel::sql_types::Text;

/// How old a `received` registration must be before it can be an orphan: a live ingest takes
/// the file's lock right after registering it.
pub const MIN_AGE_SECS: i64 = 30;

#[derive(QueryableByName)]
struct Candidate {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    tenant_id: i64,
    #[diesel(sql_type = Text)]
    arrival_key: String,
}

/// Ends the orphaned registrations of the tenants in `folders` (tenant id → its drop
/// folder); returns how many it ended.
pub async fn recover(
    ctx: &Context,
    folders: &std::collections::HashMap<i64, Arc<TenantFolder>>,
) -> anyhow::Result<usize> {
    let candidates: Vec<Candidate> = db::run(&ctx.pool, |conn| {
        Ok(diesel::sql_query(
            "SELECT id, tenant_id, arrival_key FROM import_files \
             WHERE state = 'received' AND arrival_key NOT LIKE '%:special' \
             AND received_at < now() - make_interval(secs => $1)",
        )
        .bind::<BigInt, _>(MIN_AGE_SECS)
        .load(conn)?)
    })
    .await?;
    let mut ended = 0;
    for c in candidates {
        let Some(folder) = folders.get(&c.tenant_id).cloned() else {
            continue; // another ingest's tenant, or a folder it cannot open now
        };
        // tenant:dev:ino:mtime:size:sha256
        let parts: Vec<&str> = c.arrival_key.split(':').collect();
        let (Some(ino), Some(mtime), Some(size)) = (
            parts.get(2).and_then(|v| v.parse::<u64>().ok()),
            parts.get(3).and_then(|v| v.parse::<i64>().ok()),
            parts.get(4).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let file_id = ImportFileId(c.id);
        let Some(lock) = FileLock::try_acquire(&ctx.database_url, file_id).await? else {
            continue; // being handled
        };
        let still_there = tokio::task::spawn_blocking(move || {
            folder.entries().map(|names| {
                names.iter().any(|n| {
                    folder.stat(n).is_ok_and(|s| {
                        s.regular() && s.ino == ino && s.mtime_ns == mtime && s.size == size
                    })
                })
            })
        })
        .await?;
        // A folder that cannot be listed now decides nothing.
        if !matches!(still_there, Ok(false))
            || current_state(&ctx.pool, file_id).await? != FileState::Received
        {
            lock.release().await;
            continue;
        }
        let tenant = TenantId(c.tenant_id);
        let kept = db::run(&ctx.pool, move |conn| {
            Ok(conn.transaction(|conn| ending::end(conn, file_id, tenant, &ending::Ending::Gone))?)
        })
        .await?;
        tracing::warn!(
            file_id = c.id,
            kept_rows = kept,
            "OrphanedRegistrationEnded"
        );
        ctx.kick.kick();
        lock.release().await;
        ended += 1;
    }
    Ok(ended)
}
