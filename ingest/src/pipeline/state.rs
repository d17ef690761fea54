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
        diesel::sql_query(
            "UPDATE import_files SET notices = array_append(notices, $2) \
             WHERE id = $1 AND NOT ($2 = ANY (notices))",
        )
        .bind::<BigInt, _>(file_id.0)
        .bind::<diesel::sql_types::Text, _>(notice)
        .execute(conn)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// A registered file.
pub(super) struct Registered {
    pub(super) id: ImportFileId,
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
    let (name, key, size, sha) = (
        name.to_owned(),
        arrival_key.to_owned(),
        sniff.size as i64,
        sniff.sha256.clone(),
    );
    let encoding = sniff.encoding_label();
    let chunking = ctx.chunking;
    let row: (i64, Option<i32>, Option<i32>) = db::run(&ctx.pool, move |conn| {
        let inserted = diesel::insert_into(import_files::table)
            .values((
                import_files::tenant_id.eq(tenant.0),
                import_files::file_name.eq(&name),
                import_files::arrival_key.eq(&key),
                import_files::size_bytes.eq(size),
                import_files::sha256.eq(&sha),
                import_files::encoding.eq(&encoding),
                import_files::chunk_rows.eq(chunking.rows.min(i32::MAX as usize) as i32),
                import_files::chunk_max_bytes.eq(chunking.max_bytes.min(i32::MAX as usize) as i32),
            ))
            .on_conflict(import_files::arrival_key)
            .do_nothing()
            .execute(conn)?;
        let row: (i64, Option<i32>, Option<i32>) = import_files::table
            .filter(import_files::arrival_key.eq(&key))
            .select((
                import_files::id,
                import_files::chunk_rows,
                import_files::chunk_max_bytes,
            ))
            .first(conn)?;
        if inserted == 1 {
            tracing::info!(file_id = row.0, tenant = tenant.0, size, "FileRegistered");
        }
        Ok(row)
    })
    .await?;
    Ok(Registered {
        id: ImportFileId(row.0),
        // Files registered before the chunking was stored are cut as the service says.
        chunking: Chunking {
            rows: row.1.map_or(ctx.chunking.rows, |r| r.max(1) as usize),
            max_bytes: row.2.map_or(ctx.chunking.max_bytes, |b| b.max(1) as usize),
        },
    })
}

pub(super) async fn current_state(
    pool: &PgPool,
    file_id: ImportFileId,
) -> anyhow::Result<FileState> {
    Ok(db::run(pool, move |conn| {
        Ok(import_files::table
            .find(file_id.0)
            .select(import_files::state)
            .first::<FileState>(conn)?)
    })
    .await?)
}

/// Announces a finished file to the notifier (inside the caller's transaction).
pub fn finished(
    conn: &mut PgConnection,
    file_id: ImportFileId,
    tenant_id: TenantId,
) -> Result<(), diesel::result::Error> {
    let msg = NotifyMessage::FileFinishedV1(FileFinished { file_id, tenant_id });
    let bytes = messages::encode(&msg)
        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
    outbox::enqueue(conn, QueueKind::Notify, bytes)
}

/// Marks a file failed at file level and announces it.
pub(super) async fn fail(
    ctx: &Context,
    file_id: ImportFileId,
    tenant_id: TenantId,
    problem: &FileProblem,
    sniff: Option<&Sniff>,
) -> anyhow::Result<()> {
    tracing::info!(code = problem.code.as_str(), "FileRejected");
    let code = problem.code.as_str();
    let message = problem.message.clone();
    let encoding = sniff.map(Sniff::encoding_label);
    db::run(&ctx.pool, move |conn| {
        conn.transaction(|conn| {
            let updated =
                diesel::update(import_files::table.find(file_id.0).filter(
                    import_files::state.eq_any([FileState::Received, FileState::Importing]),
                ))
                .set((
                    import_files::state.eq(FileState::Failed),
                    import_files::error_code.eq(code),
                    import_files::error_message.eq(&message),
                    import_files::encoding.eq(encoding),
                    import_files::finished_at.eq(diesel::dsl::now),
                ))
                .execute(conn)?;
            if updated == 1 {
                finished(conn, file_id, tenant_id)?;
            }
            Ok::<_, diesel::result::Error>(())
        })?;
        Ok(())
    })
    .await?;
    ctx.kick.kick();
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
