//! Routes, handlers and what each page shows. Every page is HTML, or JSON when the request
//! says `Accept: application/json` or `?format=json` (the same data, serialised). Reads and
//! writes go through `mui_shared` only.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use axum_extra::extract::cookie::CookieJar;
use chrono::{DateTime, Utc};
use diesel::PgConnection;
use futures::{Stream, StreamExt};
use maud::Markup;
use mui_shared::db::{self, DbError};
use mui_shared::deadletters::{self, DeadLetter, Selection};
use mui_shared::dispatch::{self, WorkerLine};
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::ending::{self, EndError};
use mui_shared::failures::{self, FailureFilter};
use mui_shared::files::{self, FileDetail, FileLine, FileState, FileTotals, TenantFileLine};
use mui_shared::holds::{self, HoldError};
use mui_shared::messages::RowFailure;
use mui_shared::tenants::{self, FolderStatus, Tenant};
use serde::{Deserialize, Serialize};

use crate::auth::{self, Operator};
use crate::{views, AppState};

/// Failure records per page of a file's failures table.
pub const FAILURES_PER_PAGE: i64 = 50;
/// Files a tenant's page lists.
pub const TENANT_FILES: i64 = 50;
/// Most files the overview lists.
pub const OVERVIEW_FILES: i64 = 200;

/// The vendored htmx (npm `htmx.org` 2.0.11, 0BSD licence: `console/assets/htmx.LICENSE`).
const HTMX: &[u8] = include_bytes!("../assets/htmx.min.js");
/// Its Server-Sent Events extension (npm `htmx-ext-sse` 2.2.4, 0BSD licence).
const HTMX_SSE: &[u8] = include_bytes!("../assets/htmx-ext-sse.min.js");
/// The console's style sheet.
const CSS: &[u8] = include_bytes!("../assets/console.css");
/// Where the page loads htmx from (versioned: cached for a year).
pub const HTMX_PATH: &str = "/assets/htmx-2.0.11.min.js";
/// Where the page loads the SSE extension from.
pub const HTMX_SSE_PATH: &str = "/assets/htmx-ext-sse-2.2.4.min.js";
/// Where the page loads its style sheet from.
pub const CSS_PATH: &str = "/assets/console.css";

/// Every route: the public ones (login, assets, health), the rest behind
/// [`auth::require_operator`]; all with [`auth::security_headers`].
pub fn routes(state: AppState) -> Router {
    let protected = Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/tenants", get(tenant_list))
        .route("/tenants/{slug}", get(tenant_page))
        .route("/files/{id}", get(file_page))
        .route("/files/{id}/failures.csv", get(failures_csv))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/replay", post(replay))
        .route("/held", get(held))
        .route("/held/decide", post(decide))
        .route("/waiting", get(waiting))
        .route("/waiting/end", post(end_file))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_operator,
        ));
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/healthz", get(healthz))
        .route(HTMX_PATH, get(|| asset(HTMX, "text/javascript", true)))
        .route(
            HTMX_SSE_PATH,
            get(|| asset(HTMX_SSE, "text/javascript", true)),
        )
        .route(CSS_PATH, get(|| asset(CSS, "text/css", false)))
        .merge(protected)
        .layer(middleware::from_fn(auth::security_headers))
        .with_state(state)
}

async fn asset(bytes: &'static [u8], content_type: &'static str, versioned: bool) -> Response {
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=3600"
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
        ],
        bytes,
    )
        .into_response()
}

/// Whether the request asks for the JSON twin of a page.
pub fn wants_json(headers: &HeaderMap, uri: &Uri) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    accept
        || uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "format=json"))
}

/// What a handler can fail with; each says plainly what was wrong.
#[derive(Debug)]
pub enum AppError {
    /// Nothing by that name or id.
    NotFound(String),
    /// A parameter that makes no sense.
    BadRequest(String),
    /// An action without the session's CSRF token.
    Forbidden(String),
    /// An action the state of what it names does not allow (approving a rejected file).
    Conflict(String),
    /// The database failed.
    Db(DbError),
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        AppError::Db(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            AppError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            AppError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            AppError::Conflict(m) => (StatusCode::CONFLICT, m),
            AppError::Db(e) => {
                let chain =
                    std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(": ");
                tracing::warn!(error = %chain, "ConsoleDatabaseError");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the database could not answer: {chain}"),
                )
            }
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            msg,
        )
            .into_response()
    }
}

type Result<T> = std::result::Result<T, AppError>;

/// Runs `f` on a pooled connection off the async threads.
async fn query<T, F>(state: &AppState, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut PgConnection) -> std::result::Result<T, DbError> + Send + 'static,
{
    Ok(db::run(&state.pool, f).await?)
}

/// The page as HTML, or its data as JSON.
fn respond<T: Serialize>(json: bool, data: &T, html: impl FnOnce(&T) -> Markup) -> Response {
    if json {
        Json(data).into_response()
    } else {
        html(data).into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Login
// ---------------------------------------------------------------------------------------

async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.auth.operator(&headers).is_some() {
        return Redirect::to("/").into_response();
    }
    views::login(None).into_response()
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The operators' token.
    #[serde(default)]
    pub token: String,
}

async fn login(
    State(state): State<AppState>,
    jar: CookieJar,
    Form(f): Form<LoginForm>,
) -> Response {
    match state.auth.login(&f.token) {
        Some(id) => {
            tracing::info!("ConsoleLogin");
            (jar.add(state.auth.cookie(id)), Redirect::to("/")).into_response()
        }
        None => {
            tracing::warn!("ConsoleLoginRefused");
            // Slows down guessing; the token itself is long.
            tokio::time::sleep(Duration::from_millis(300)).await;
            (
                StatusCode::UNAUTHORIZED,
                views::login(Some("That is not the operator token.")),
            )
                .into_response()
        }
    }
}

/// An action's CSRF field.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    jar: CookieJar,
    Form(f): Form<CsrfForm>,
) -> Result<Response> {
    check_csrf(&op, f.csrf.as_deref())?;
    if let Some(c) = jar.get(auth::COOKIE) {
        state.auth.logout(c.value());
    }
    Ok((jar.add(state.auth.removal()), Redirect::to("/login")).into_response())
}

fn check_csrf(op: &Operator, presented: Option<&str>) -> Result<()> {
    if op.check_csrf(presented) {
        Ok(())
    } else {
        tracing::warn!("ConsoleCsrfRefused");
        Err(AppError::Forbidden(
            "this action's form did not carry this session's CSRF token: reload the page and try again"
                .to_owned(),
        ))
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let ok = db::run(&state.pool, |conn| {
        use diesel::RunQueryDsl;
        diesel::sql_query("SELECT 1").execute(conn)?;
        Ok(())
    })
    .await;
    match ok {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// Files as the pages show them
// ---------------------------------------------------------------------------------------

/// A file with what the pages derive from it.
#[derive(Debug, Clone, Serialize)]
pub struct FileView {
    /// The tenant's slug.
    pub tenant: String,
    /// The file as `muictl files list` shows it.
    #[serde(flatten)]
    pub file: FileLine,
    /// Its state in words: `importing 3/10`, `dead-lettered`, ...
    pub status: String,
    /// Rows handled so far (imported or failed).
    pub rows_done: i64,
    /// Rows handled per second, on average since the file was received.
    pub rows_per_sec: Option<f64>,
    /// Its dead letters not yet replayed.
    pub dead_letters: i64,
}

impl FileView {
    /// A file of `tenant`, with its dead letters not yet replayed.
    pub fn new(tenant: String, file: FileLine, dead_letters: i64, now: DateTime<Utc>) -> Self {
        let rows_done = file.rows_imported() + file.rows_failed;
        let status = if dead_letters > 0 && file.state != FileState::Done {
            "dead-lettered".to_owned()
        } else if file.is_held() {
            "held: waiting for approve or reject".to_owned()
        } else if file.state == FileState::Importing
            || (file.state == FileState::Received && file.chunks_done > 0)
        {
            format!(
                "{} {}/{}",
                file.state,
                file.chunks_done,
                file.total_chunks.map_or("?".to_owned(), |n| n.to_string())
            )
        } else {
            file.state.to_string()
        };
        let end = file.finished_at.unwrap_or(now);
        let secs = (end - file.received_at).num_milliseconds() as f64 / 1000.0;
        let rows_per_sec = (rows_done > 0 && secs > 0.0).then(|| rows_done as f64 / secs);
        Self {
            tenant,
            file,
            status,
            rows_done,
            rows_per_sec,
            dead_letters,
        }
    }

    /// Percent of the rows handled, once the total is known.
    pub fn percent(&self) -> Option<i64> {
        self.file
            .rows_total
            .filter(|t| *t > 0)
            .map(|t| (self.rows_done * 100 / t).min(100))
    }
}

fn dead_per_file(letters: &[DeadLetter]) -> HashMap<i64, i64> {
    let mut m = HashMap::new();
    for d in letters.iter().filter(|d| d.replayed_at.is_none()) {
        if let Some(f) = d.file_id {
            *m.entry(f).or_insert(0) += 1;
        }
    }
    m
}

// ---------------------------------------------------------------------------------------
// Overview and its live updates
// ---------------------------------------------------------------------------------------

/// Chunks in the queue of one tenant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantQueue {
    /// The tenant's slug.
    pub tenant: String,
    /// Chunks waiting to be handed out.
    pub waiting: i64,
    /// Chunks handed out, not imported yet.
    pub in_flight: i64,
    /// Chunks dead-lettered.
    pub dead: i64,
}

/// The overview.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// When it was read.
    pub generated_at: DateTime<Utc>,
    /// Files being imported, every tenant, newest first.
    pub in_progress: Vec<FileView>,
    /// Files received in the last hour and finished, newest first.
    pub last_hour: Vec<FileView>,
    /// Rows that failed in the last hour's files (and those in progress).
    pub failed_rows_last_hour: i64,
    /// Files of the last hour refused as a whole.
    pub failed_files_last_hour: i64,
    /// Dead letters not yet replayed.
    pub dead_letters: usize,
    /// Files whose report is held.
    pub held: usize,
    /// Files held by the mass-deactivation guard, waiting for approve or reject.
    pub awaiting_decision: usize,
    /// The chunk queue per tenant.
    pub queue: Vec<TenantQueue>,
    /// The worker leading the dispatcher, if one does.
    pub dispatcher: Option<String>,
    /// Workers seen in the last minute.
    pub workers: Vec<WorkerLine>,
}

/// Reads the overview.
pub fn load_overview(conn: &mut PgConnection) -> std::result::Result<Overview, DbError> {
    let now = Utc::now();
    let recent = files::open_or_recent(conn, now - chrono::Duration::hours(1), OVERVIEW_FILES)?;
    let letters = deadletters::list(conn, None, false)?;
    let dead = dead_per_file(&letters);
    let held = files::held(conn)?.len();
    let awaiting_decision = files::awaiting_decision(conn)?.len();
    let q = dispatch::overview(conn)?;
    let mut queue: BTreeMap<String, TenantQueue> = BTreeMap::new();
    for f in q.files {
        let e = queue
            .entry(f.tenant.clone())
            .or_insert_with(|| TenantQueue {
                tenant: f.tenant.clone(),
                ..TenantQueue::default()
            });
        e.waiting += f.waiting;
        e.in_flight += f.in_flight;
        e.dead += f.dead;
    }
    let (mut in_progress, mut last_hour) = (Vec::new(), Vec::new());
    let (mut failed_rows, mut failed_files) = (0, 0);
    for TenantFileLine { tenant, file } in recent {
        let n = dead.get(&file.id).copied().unwrap_or(0);
        failed_rows += file.rows_failed;
        if file.state == FileState::Failed {
            failed_files += 1;
        }
        let v = FileView::new(tenant, file, n, now);
        if v.file.state.is_finished() {
            last_hour.push(v);
        } else {
            in_progress.push(v);
        }
    }
    Ok(Overview {
        generated_at: now,
        in_progress,
        last_hour,
        failed_rows_last_hour: failed_rows,
        failed_files_last_hour: failed_files,
        dead_letters: letters.len(),
        held,
        awaiting_decision,
        queue: queue.into_values().collect(),
        dispatcher: q.leader,
        workers: q.workers,
    })
}

async fn overview(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let o = query(&state, load_overview).await?;
    Ok(respond(wants_json(&headers, &uri), &o, |o| {
        views::overview(&op, o)
    }))
}

/// The overview's live part, sent as an `overview` event every `refresh_secs` (the page's
/// htmx SSE extension swaps it in); ends at shutdown.
async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = std::result::Result<Event, Infallible>>> {
    let every = Duration::from_secs(state.refresh_secs);
    let shutdown = state.shutdown.clone();
    let stream = futures::stream::unfold((state, true), move |(state, first)| async move {
        if !first {
            tokio::time::sleep(every).await;
        }
        let event = match db::run(&state.pool, load_overview).await {
            Ok(o) => Event::default()
                .event("overview")
                .data(views::overview_live(&o).into_string()),
            Err(e) => Event::default()
                .event("overview")
                .data(views::live_error(&e.to_string()).into_string()),
        };
        Some((Ok(event), (state, false)))
    })
    .take_until(shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default())
}

// ---------------------------------------------------------------------------------------
// Tenants
// ---------------------------------------------------------------------------------------

/// A tenant in the list.
#[derive(Debug, Clone, Serialize)]
pub struct TenantSummary {
    /// The tenant and its settings.
    pub tenant: Tenant,
    /// Why reports cannot be mailed, if they cannot.
    pub mail_problem: Option<String>,
    /// What ingest last found in its drop folder.
    pub folder: Option<FolderStatus>,
    /// Its files summed up.
    pub totals: FileTotals,
}

async fn tenant_list(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let list = query(&state, |conn| {
        let mut out = Vec::new();
        for t in tenants::list(conn)? {
            out.push(TenantSummary {
                mail_problem: t.missing_mail_settings(),
                folder: tenants::folder_status(conn, t.tenant_id())?,
                totals: files::totals_of(conn, t.tenant_id())?,
                tenant: t,
            });
        }
        Ok(out)
    })
    .await?;
    Ok(respond(wants_json(&headers, &uri), &list, |l| {
        views::tenants(&op, l)
    }))
}

/// One tenant's page.
#[derive(Debug, Clone, Serialize)]
pub struct TenantPage {
    /// The tenant, its settings and totals.
    #[serde(flatten)]
    pub summary: TenantSummary,
    /// Its login sources.
    pub login_sources: Vec<String>,
    /// Its user types.
    pub user_types: Vec<String>,
    /// Its latest files, newest first.
    pub files: Vec<FileView>,
    /// Its dead letters not yet replayed.
    pub dead_letters: Vec<DeadLetter>,
}

fn find_tenant(
    conn: &mut PgConnection,
    slug: &str,
) -> std::result::Result<Option<Tenant>, DbError> {
    Ok(tenants::find_by_slug(conn, slug)?)
}

async fn tenant_page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let wanted = slug.clone();
    let page = query(&state, move |conn| {
        let Some(t) = find_tenant(conn, &wanted)? else {
            return Ok(None);
        };
        let id = t.tenant_id();
        let letters = deadletters::list(conn, Some(t.id), false)?;
        let dead = dead_per_file(&letters);
        let now = Utc::now();
        let files = files::list_file_lines(conn, id, TENANT_FILES)?
            .into_iter()
            .map(|f| {
                let n = dead.get(&f.id).copied().unwrap_or(0);
                FileView::new(t.slug.clone(), f, n, now)
            })
            .collect();
        Ok(Some(TenantPage {
            login_sources: tenants::login_sources_of(conn, id)?,
            user_types: tenants::user_types_of(conn, id)?,
            files,
            dead_letters: letters,
            summary: TenantSummary {
                mail_problem: t.missing_mail_settings(),
                folder: tenants::folder_status(conn, id)?,
                totals: files::totals_of(conn, id)?,
                tenant: t,
            },
        }))
    })
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no tenant {slug:?}")))?;
    Ok(respond(wants_json(&headers, &uri), &page, |p| {
        views::tenant(&op, p)
    }))
}

// ---------------------------------------------------------------------------------------
// One file
// ---------------------------------------------------------------------------------------

/// One step of a file's life, with when it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What happened.
    pub what: &'static str,
    /// When, if it did.
    pub at: Option<DateTime<Utc>>,
    /// Seconds after the upload was received.
    pub after_secs: Option<f64>,
}

/// A page of a file's failure records.
#[derive(Debug, Clone, Serialize)]
pub struct FailuresTable {
    /// Records matching the filter.
    pub total: i64,
    /// This page (1-based).
    pub page: i64,
    /// Pages in all (at least 1).
    pub pages: i64,
    /// The filter.
    pub code: Option<String>,
    /// The filter.
    pub column: Option<String>,
    /// Codes to filter by.
    pub codes: Vec<String>,
    /// Columns to filter by.
    pub columns: Vec<String>,
    /// The records of this page.
    pub rows: Vec<RowFailure>,
}

/// One file's page.
#[derive(Debug, Clone, Serialize)]
pub struct FilePage {
    /// The file.
    pub file: FileView,
    /// More about it.
    pub detail: FileDetail,
    /// Its header as uploaded.
    pub header: Vec<String>,
    /// Upload to mail.
    pub timeline: Vec<Step>,
    /// Its failure records, one page.
    pub failures: FailuresTable,
    /// The failures CSV, as mailed.
    pub failures_csv: String,
    /// Its dead letters, replayed ones too.
    pub dead_letters: Vec<DeadLetter>,
}

/// The failures table's query: filter and page.
#[derive(Debug, Default, Deserialize)]
pub struct FailuresQuery {
    /// Only records with an error of this code.
    pub code: Option<String>,
    /// Only records with an error on this column.
    pub column: Option<String>,
    /// Page number, from 1.
    pub page: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn parse_id(what: &str, raw: &str) -> Result<i64> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            AppError::BadRequest(format!("{what} {raw:?} is not a positive whole number"))
        })
}

async fn file_page(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Path(id): Path<String>,
    Query(q): Query<FailuresQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let id = parse_id("file id", &id)?;
    let page = match q.page.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        None => 1,
        Some(p) => parse_id("page", p)?,
    };
    let filter = FailureFilter {
        code: non_empty(q.code),
        column: non_empty(q.column),
    };
    let data = query(&state, move |conn| {
        let Some((file, detail)) = files::file_detail(conn, ImportFileId(id))? else {
            return Ok(None);
        };
        let tenant = tenants::find(conn, TenantId(detail.tenant_id))?;
        let slug = tenant.map(|t| t.slug).unwrap_or_default();
        let letters: Vec<DeadLetter> = deadletters::list(conn, Some(detail.tenant_id), true)?
            .into_iter()
            .filter(|d| d.file_id == Some(id))
            .collect();
        let pending = letters.iter().filter(|d| d.replayed_at.is_none()).count() as i64;
        let (total, rows) = failures::failures_page(
            conn,
            ImportFileId(id),
            &filter,
            (page - 1) * FAILURES_PER_PAGE,
            FAILURES_PER_PAGE,
        )?;
        let (codes, columns) = failures::failure_facets(conn, ImportFileId(id))?;
        let received = file.received_at;
        let step = |what, at: Option<DateTime<Utc>>| Step {
            what,
            at,
            after_secs: at.map(|t| (t - received).num_milliseconds() as f64 / 1000.0),
        };
        let timeline = vec![
            step("received (upload finished, registered)", Some(received)),
            step("all chunks queued (rows counted)", detail.queued_at),
            step(
                if file.state == FileState::Failed {
                    "failed as a whole"
                } else {
                    "imported (last chunk done)"
                },
                file.finished_at,
            ),
            step("report status last changed", detail.notified_at),
        ];
        let header = failures::header_of(detail.header.clone());
        Ok(Some(FilePage {
            file: FileView::new(slug, file, pending, Utc::now()),
            header,
            timeline,
            failures: FailuresTable {
                total,
                page,
                pages: ((total + FAILURES_PER_PAGE - 1) / FAILURES_PER_PAGE).max(1),
                code: filter.code,
                column: filter.column,
                codes,
                columns,
                rows,
            },
            failures_csv: format!("/files/{id}/failures.csv"),
            detail,
            dead_letters: letters,
        }))
    })
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no file with id {id}")))?;
    Ok(respond(wants_json(&headers, &uri), &data, |d| {
        views::file(&op, d)
    }))
}

/// The failures CSV exactly as the report attaches it (`muictl files failures`), whole.
async fn failures_csv(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = parse_id("file id", &id)?;
    let (file_name, header) = query(&state, move |conn| {
        Ok(failures::name_and_header(conn, ImportFileId(id))?)
    })
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no file with id {id}")))?;
    // Streamed a page of records at a time (failures::write_file_csv) through a bounded
    // channel: the console's memory does not grow with the file's failures. A failure
    // part-way cuts the download short (the client sees an incomplete body) and is logged.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let pool = state.pool.clone();
    tokio::task::spawn_blocking(move || {
        let mut sink = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHANNEL_CHUNK),
        };
        let outcome = pool
            .get()
            .map_err(|e| e.to_string())
            .and_then(|mut conn| {
                failures::write_file_csv(&mut conn, ImportFileId(id), &header, &mut sink)
                    .map_err(|e| e.to_string())
            })
            .and_then(|_| sink.flush_out().map_err(|e| e.to_string()));
        if let Err(e) = outcome {
            tracing::warn!(file_id = id, error = %e, "FailuresDownloadCut");
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let body = axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let name = failures::attachment_name(&file_name);
    // The name as an RFC 5987 value: every byte outside the unreserved set percent-encoded.
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let disposition =
        format!("attachment; filename=\"failures-{id}.csv\"; filename*=UTF-8''{encoded}");
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

/// Bytes handed to the response body at a time.
const CHANNEL_CHUNK: usize = 64 * 1024;

/// A blocking writer into the download's channel, in chunks of [`CHANNEL_CHUNK`]; a
/// client gone away is a write error, which stops the query.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn flush_out(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHANNEL_CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHANNEL_CHUNK {
            self.flush_out()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Dead letters and replay
// ---------------------------------------------------------------------------------------

/// The dead letters page's query.
#[derive(Debug, Default, Deserialize)]
pub struct DeadLettersQuery {
    /// Only this tenant's.
    pub tenant: Option<String>,
    /// Replayed ones too (`1`).
    pub replayed: Option<String>,
}

/// The dead letters page.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLettersPage {
    /// The tenant shown, if one.
    pub tenant: Option<String>,
    /// Whether replayed ones are listed.
    pub include_replayed: bool,
    /// The dead letters, oldest first.
    pub letters: Vec<DeadLetter>,
}

async fn dead_letters(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    Query(q): Query<DeadLettersQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let tenant = non_empty(q.tenant);
    let include_replayed = q
        .replayed
        .as_deref()
        .is_some_and(|r| r == "1" || r == "true");
    let wanted = tenant.clone();
    let letters = query(&state, move |conn| {
        let id = match wanted {
            Some(slug) => match find_tenant(conn, &slug)? {
                Some(t) => Some(t.id),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some(deadletters::list(conn, id, include_replayed)?))
    })
    .await?
    .ok_or_else(|| {
        AppError::NotFound(format!("no tenant {:?}", tenant.as_deref().unwrap_or("")))
    })?;
    let page = DeadLettersPage {
        tenant,
        include_replayed,
        letters,
    };
    Ok(respond(wants_json(&headers, &uri), &page, |p| {
        views::dead_letters(&op, p)
    }))
}

/// The replay form: the tenant it is about, and one dead letter (`id`), one file's
/// (`file`) or, with neither, every dead letter of the tenant not yet replayed.
#[derive(Debug, Deserialize)]
pub struct ReplayForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// The tenant's slug.
    pub tenant: Option<String>,
    /// One dead letter.
    pub id: Option<String>,
    /// One file's dead letters.
    pub file: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayResult {
    /// The tenant.
    pub tenant: String,
    /// `dead letter N`, `file N` or `tenant`.
    pub scope: String,
    /// Dead letters sent again.
    pub replayed: Vec<i64>,
    /// Dead letters left alone, and why.
    pub skipped: Vec<(i64, String)>,
}

async fn replay(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<ReplayForm>,
) -> Result<Response> {
    check_csrf(&op, f.csrf.as_deref())?;
    let slug = non_empty(f.tenant).ok_or_else(|| {
        AppError::BadRequest("say which tenant (the form's `tenant` field)".to_owned())
    })?;
    let id = non_empty(f.id)
        .map(|i| parse_id("dead letter id", &i))
        .transpose()?;
    let file = non_empty(f.file)
        .map(|i| parse_id("file id", &i))
        .transpose()?;
    let scope = match (id, file) {
        (Some(_), Some(_)) => {
            return Err(AppError::BadRequest(
                "say one dead letter (`id`) or one file (`file`), not both".to_owned(),
            ))
        }
        (Some(i), None) => format!("dead letter {i}"),
        (None, Some(fid)) => format!("file {fid}"),
        (None, None) => "tenant".to_owned(),
    };
    let wanted = slug.clone();
    let outcome = query(&state, move |conn| {
        let Some(t) = find_tenant(conn, &wanted)? else {
            return Ok(Err(AppError::NotFound(format!("no tenant {wanted:?}"))));
        };
        // Only this tenant's dead letters are ever selected.
        let done = match (id, file) {
            (None, None) => deadletters::replay(conn, Selection::Tenant(t.id))?,
            _ => {
                let mine = deadletters::list(conn, Some(t.id), true)?;
                let chosen: Vec<i64> = mine
                    .iter()
                    .filter(|d| match (id, file) {
                        (Some(i), _) => d.id == i,
                        (None, Some(fid)) => d.file_id == Some(fid) && d.replayed_at.is_none(),
                        (None, None) => false,
                    })
                    .map(|d| d.id)
                    .collect();
                if let (Some(i), true) = (id, chosen.is_empty()) {
                    return Ok(Err(AppError::NotFound(format!(
                        "tenant {:?} has no dead letter {i}",
                        t.slug
                    ))));
                }
                let mut all = deadletters::Replayed::default();
                for d in chosen {
                    let r = deadletters::replay(conn, Selection::Id(d))?;
                    all.replayed.extend(r.replayed);
                    all.skipped.extend(r.skipped);
                }
                all
            }
        };
        Ok(Ok(done))
    })
    .await??;
    tracing::info!(tenant = %slug, scope = %scope, replayed = outcome.replayed.len(), "ConsoleReplay");
    let result = ReplayResult {
        tenant: slug,
        scope,
        replayed: outcome.replayed,
        skipped: outcome.skipped,
    };
    Ok(respond(wants_json(&headers, &uri), &result, |r| {
        views::replayed(&op, r)
    }))
}

// ---------------------------------------------------------------------------------------
// Held
// ---------------------------------------------------------------------------------------

/// A file whose report is held, and why.
#[derive(Debug, Clone, Serialize)]
pub struct HeldFile {
    /// The file.
    pub file: FileView,
    /// Why no mail went out.
    pub why: String,
}

/// The held page: files the mass-deactivation guard holds before any change, waiting for
/// the operator's decision, and files whose report mail is held.
#[derive(Debug, Clone, Serialize)]
pub struct HeldPage {
    /// Files waiting for approve or reject, oldest first (later files of the same tenant
    /// wait behind each).
    pub awaiting_decision: Vec<FileView>,
    /// Files whose report could not be mailed, and why.
    pub held_mail: Vec<HeldFile>,
}

async fn held(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let page = query(&state, |conn| {
        let now = Utc::now();
        let awaiting_decision = files::awaiting_decision(conn)?
            .into_iter()
            .map(|TenantFileLine { tenant, file }| FileView::new(tenant, file, 0, now))
            .collect();
        let mut held_mail = Vec::new();
        let mut reasons: HashMap<String, Option<String>> = HashMap::new();
        for TenantFileLine { tenant, file } in files::held(conn)? {
            if !reasons.contains_key(&tenant) {
                let why = find_tenant(conn, &tenant)?.and_then(|t| t.missing_mail_settings());
                reasons.insert(tenant.clone(), why);
            }
            let why = file
                .notify_detail
                .clone()
                .or_else(|| reasons.get(&tenant).cloned().flatten())
                .unwrap_or_else(|| "no reason recorded".to_owned());
            held_mail.push(HeldFile {
                file: FileView::new(tenant, file, 0, now),
                why,
            });
        }
        Ok(HeldPage {
            awaiting_decision,
            held_mail,
        })
    })
    .await?;
    Ok(respond(wants_json(&headers, &uri), &page, |p| {
        views::held(&op, p)
    }))
}

/// The form's tenant slug and file id, or what is missing or wrong.
fn tenant_and_file(tenant: Option<String>, file: Option<String>) -> Result<(String, i64)> {
    let slug = non_empty(tenant).ok_or_else(|| {
        AppError::BadRequest("say which tenant (the form's `tenant` field)".to_owned())
    })?;
    let file = non_empty(file)
        .ok_or_else(|| AppError::BadRequest("say which file (the form's `file` field)".to_owned()))
        .and_then(|raw| parse_id("file id", &raw))?;
    Ok((slug, file))
}

/// `None` when `file` is a file of the tenant `slug`; otherwise the 404 to answer.
fn not_the_tenants(
    conn: &mut PgConnection,
    slug: &str,
    file: i64,
) -> std::result::Result<Option<AppError>, DbError> {
    let Some(t) = find_tenant(conn, slug)? else {
        return Ok(Some(AppError::NotFound(format!("no tenant {slug:?}"))));
    };
    Ok(match files::file_line(conn, file)? {
        Some((_, owner)) if owner == t.slug => None,
        _ => Some(AppError::NotFound(format!(
            "tenant {:?} has no file {file}",
            t.slug
        ))),
    })
}

/// The decision form: approve or reject one held file of the tenant it names.
#[derive(Debug, Deserialize)]
pub struct DecideForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// The tenant's slug: the file must be this tenant's.
    pub tenant: Option<String>,
    /// The held file's id.
    pub file: Option<String>,
    /// `approve` or `reject`.
    pub decision: Option<String>,
}

/// What a decision did.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionResult {
    /// The tenant.
    pub tenant: String,
    /// The file.
    pub file: i64,
    /// `approve` or `reject`.
    pub decision: String,
    /// Whether it was taken now (`false`: it had been taken already, nothing changed).
    pub done_now: bool,
}

/// Approves or rejects a held file through [`holds::approve`] / [`holds::reject`], as
/// `muictl files approve|reject` does: idempotent (the same decision twice does nothing
/// the second time); the opposite decision of one taken is refused (409).
async fn decide(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<DecideForm>,
) -> Result<Response> {
    check_csrf(&op, f.csrf.as_deref())?;
    let (slug, file) = tenant_and_file(f.tenant, f.file)?;
    let decision = non_empty(f.decision).unwrap_or_default();
    let approve = match decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => {
            return Err(AppError::BadRequest(format!(
                "decision {other:?} is neither `approve` nor `reject`"
            )))
        }
    };
    let by = op.recorded_as();
    let wanted = slug.clone();
    let outcome = query(&state, move |conn| {
        // Only a file of the tenant the form names is ever touched.
        if let Some(refused) = not_the_tenants(conn, &wanted, file)? {
            return Ok(Err(refused));
        }
        let id = ImportFileId(file);
        let r = if approve {
            holds::approve(conn, id, by)
        } else {
            holds::reject(conn, id, by)
        };
        Ok(match r {
            Ok(o) => Ok(o),
            Err(HoldError::Db(e)) => return Err(DbError::from(e)),
            Err(e @ (HoldError::Decided { .. } | HoldError::StillReading(_))) => {
                Err(AppError::Conflict(e.to_string()))
            }
            Err(e @ HoldError::NoSuchFile(_)) => Err(AppError::NotFound(e.to_string())),
            Err(e) => Err(AppError::BadRequest(e.to_string())),
        })
    })
    .await??;
    let done_now = outcome == holds::Outcome::Done;
    tracing::info!(tenant = %slug, file, decision = %decision, done_now, "ConsoleDecision");
    let result = DecisionResult {
        tenant: slug,
        file,
        decision,
        done_now,
    };
    Ok(respond(wants_json(&headers, &uri), &result, |r| {
        views::decided(&op, r)
    }))
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// The waiting page: every file not finished or whose report did not go out, with what it
/// waits on and what resolves it ([`files::waiting`], as `muictl files waiting`).
#[derive(Debug, Clone, Serialize)]
pub struct WaitingPage {
    /// Oldest first.
    pub files: Vec<files::WaitingFile>,
}

async fn waiting(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response> {
    let files = query(&state, |conn| Ok(files::waiting(conn)?)).await?;
    let page = WaitingPage { files };
    Ok(respond(wants_json(&headers, &uri), &page, |p| {
        views::waiting(&op, p)
    }))
}

/// The end form: end one registered file nothing reads, of the tenant it names.
#[derive(Debug, Deserialize)]
pub struct EndForm {
    /// The session's CSRF token.
    pub csrf: Option<String>,
    /// The tenant's slug: the file must be this tenant's.
    pub tenant: Option<String>,
    /// The file's id.
    pub file: Option<String>,
    /// Why, for the tenant's report.
    pub reason: Option<String>,
}

/// Ends a registered file that nothing reads through [`ending::end_by_operator`], as
/// `muictl files end` does; refused (409) for a file being read, held, or past `received`.
async fn end_file(
    State(state): State<AppState>,
    Extension(op): Extension<Operator>,
    headers: HeaderMap,
    uri: Uri,
    Form(f): Form<EndForm>,
) -> Result<Response> {
    check_csrf(&op, f.csrf.as_deref())?;
    let (slug, file) = tenant_and_file(f.tenant, f.file)?;
    let reason = non_empty(f.reason).ok_or_else(|| {
        AppError::BadRequest(
            "say why (the form's `reason` field): it goes into the tenant's report".to_owned(),
        )
    })?;
    let by = op.recorded_as();
    let wanted = slug.clone();
    let ended = query(&state, move |conn| {
        // Only a file of the tenant the form names is ever touched.
        if let Some(refused) = not_the_tenants(conn, &wanted, file)? {
            return Ok(Err(refused));
        }
        Ok(
            match ending::end_by_operator(conn, ImportFileId(file), by, &reason) {
                Ok(e) => Ok(e),
                Err(EndError::Db(e)) => return Err(DbError::from(e)),
                Err(e @ EndError::NoSuchFile(_)) => Err(AppError::NotFound(e.to_string())),
                Err(e) => Err(AppError::Conflict(e.to_string())),
            },
        )
    })
    .await??;
    tracing::info!(tenant = %slug, file, kept_rows = ended.kept_rows, "ConsoleEndedFile");
    Ok(respond(wants_json(&headers, &uri), &ended, |e| {
        views::ended(&op, &slug, e)
    }))
}
