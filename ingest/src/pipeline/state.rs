//! What ingest records of a file: registering it under its arrival key, its notices, a
//! file-level failure, "file finished" for the notifier, and the advisory lock that keeps a
//! second ingest off a file being handled.

use super::*;

/// Records a notice for the tenant and the operator on the file (once, however often a
/// retry records it).
pub(super) async fn add_notice(
    pool: &PgPool,
    file_id: ImportFileId,
    notice: String,
) -> anyhow::Result<()> {
    db::run(pool, move |conn| {
        Ok(files::add_notice(conn, file_id, &notice)?)
    })
    .await?;
    Ok(())
}

/// A registered file.
pub(super) struct Registered {
    pub(super) id: ImportFileId,
    /// Registered now (not found from an earlier attempt).
    pub(super) new: bool,
    /// How it is cut into chunks, as fixed when it was registered.
    pub(super) chunking: Chunking,
}

pub(super) async fn register(
    ctx: &Context,
    tenant: TenantId,
    name: &str,
    arrival_key: &str,
    sniff: &Sniff,
) -> anyhow::Result<Registered> {
    let (name, key, sha) = (
        name.to_owned(),
        arrival_key.to_owned(),
        sniff.sha256.clone(),
    );
    let size = sniff.size as i64;
    let encoding = sniff.encoding_label();
    let chunking = ctx.chunking;
    let r = db::run(&ctx.pool, move |conn| {
        let r = files::register(
            conn,
            &files::NewFile {
                tenant,
                name: &name,
                arrival_key: &key,
                size,
                sha256: &sha,
                encoding: &encoding,
                chunk_rows: chunking.rows.min(i32::MAX as usize) as i32,
                chunk_max_bytes: chunking.max_bytes.min(i32::MAX as usize) as i32,
            },
        )?;
        if r.new {
            tracing::info!(file_id = r.id.0, tenant = tenant.0, size, "FileRegistered");
        }
        Ok(r)
    })
    .await?;
    Ok(Registered {
        id: r.id,
        new: r.new,
        // Files registered before the chunking was stored are cut as the service says.
        chunking: Chunking {
            rows: r
                .chunk_rows
                .map_or(ctx.chunking.rows, |n| n.max(1) as usize),
            max_bytes: r
                .chunk_max_bytes
                .map_or(ctx.chunking.max_bytes, |n| n.max(1) as usize),
        },
    })
}

pub(super) async fn current_state(
    pool: &PgPool,
    file_id: ImportFileId,
) -> anyhow::Result<FileState> {
    Ok(db::run(pool, move |conn| Ok(files::state_of(conn, file_id)?)).await?)
}

/// Marks a file failed at file level and announces it.
pub(super) async fn fail(
    ctx: &Context,
    file_id: ImportFileId,
    tenant: &Tenant,
    problem: &FileProblem,
    sniff: Option<&Sniff>,
) -> anyhow::Result<()> {
    tracing::info!(code = problem.code.as_str(), "FileRejected");
    mui_shared::otel::set_error(&tracing::Span::current(), problem.code.as_str());
    metrics::counter!("mui_files_failed_total", "tenant" => tenant.slug.clone()).increment(1);
    let tenant_id = tenant.tenant_id();
    let code = problem.code.as_str();
    let message = problem.message.clone();
    let encoding = sniff.map(Sniff::encoding_label);
    db::run(&ctx.pool, move |conn| {
        Ok(files::fail(
            conn,
            file_id,
            tenant_id,
            code,
            &message,
            encoding.as_deref(),
        )?)
    })
    .await?;
    ctx.kick.kick();
    Ok(())
}

/// Makes `span` (ingest's span for the file, not entered yet) the file's trace: a file
/// registered before (handled again after a restart) continues the trace stored with it;
/// a new one stores the span's trace id and context with the file, where the fair
/// dispatcher and `muictl files show` find them. Nothing happens when tracing is off.
pub(super) async fn adopt_trace(
    pool: &PgPool,
    file_id: ImportFileId,
    span: &tracing::Span,
) -> anyhow::Result<()> {
    if !mui_shared::otel::enabled() {
        return Ok(());
    }
    let stored = db::run(pool, move |conn| {
        Ok(import_files::table
            .find(file_id.0)
            .select(import_files::trace_context)
            .first::<Option<serde_json::Value>>(conn)
            .optional()?
            .flatten())
    })
    .await?;
    let stored = TraceContext::from_json(stored);
    if !stored.is_empty() {
        stored.parent(span);
        return Ok(());
    }
    let mine = TraceContext::of(span);
    let (id, json) = (mine.trace_id(), mine.to_json());
    db::run(pool, move |conn| {
        diesel::update(
            import_files::table
                .find(file_id.0)
                .filter(import_files::trace_context.is_null()),
        )
        .set((
            import_files::trace_id.eq(id),
            import_files::trace_context.eq(json),
        ))
        .execute(conn)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// Session advisory lock on one file id, held on a dedicated connection so that it dies with
/// the process.
pub(super) struct FileLock {
    conn: Option<PgConnection>,
}

impl FileLock {
    pub(super) async fn try_acquire(
        url: &str,
        file_id: ImportFileId,
    ) -> anyhow::Result<Option<FileLock>> {
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut conn = PgConnection::establish(&url).context("connecting for the file lock")?;
            // A vanished ingest host's lock must not outlive it by hours.
            diesel::sql_query(mui_shared::db::DEAD_PEER_SETTINGS).execute(&mut conn)?;
            #[derive(QueryableByName)]
            struct Locked {
                #[diesel(sql_type = Bool)]
                locked: bool,
            }
            let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS locked")
                .bind::<BigInt, _>(file_id.0)
                .get_result(&mut conn)?;
            Ok(got.locked.then_some(FileLock { conn: Some(conn) }))
        })
        .await?
    }

    /// Closes the connection (which releases the lock) off the async threads.
    pub(super) async fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = tokio::task::spawn_blocking(move || drop(conn)).await;
        }
    }
}

impl std::fmt::Debug for FileLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileLock")
    }
}
