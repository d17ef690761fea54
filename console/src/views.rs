//! The HTML of every page, rendered with maud: every value is escaped when inserted (a
//! tenant's `<script>` in a file name or a cell shows as text); nothing here uses
//! `PreEscaped`. No inline script or style: the Content-Security-Policy forbids them.

use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};
use mui_shared::deadletters::DeadLetter;

use crate::auth::Operator;
use crate::pages::{
    DeadLettersPage, DecisionResult, FilePage, FileView, HeldPage, Overview, ReplayResult,
    TenantPage, TenantSummary, WaitingPage, CSS_PATH, HTMX_PATH, HTMX_SSE_PATH,
};

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {} s", (s / 60.0) as i64, (s % 60.0) as i64)
    } else {
        format!(
            "{} h {} min",
            (s / 3600.0) as i64,
            ((s % 3600.0) / 60.0) as i64
        )
    }
}

fn page(title: &str, op: Option<&Operator>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx must not inject its indicator style (the CSP allows no inline style).
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
                title { (title) " · MUI console" }
                link rel="stylesheet" href=(CSS_PATH);
                script src=(HTMX_PATH) defer {}
                script src=(HTMX_SSE_PATH) defer {}
            }
            body {
                header {
                    strong { "Managed User Import" }
                    @if let Some(op) = op {
                        nav {
                            a href="/" { "Overview" }
                            a href="/tenants" { "Tenants" }
                            a href="/dead-letters" { "Dead letters" }
                            a href="/held" { "Held" }
                            a href="/waiting" { "Waiting" }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(op.csrf_token());
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// The login form, with a message.
pub fn login(message: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            @if let Some(m) = message { p.notice { (m) } }
            form method="post" action="/login" {
                label for="token" { "Operator token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
            p.hint { "The token is the console's MUI_CONSOLE_TOKEN (or the file MUI_CONSOLE_TOKEN_FILE names)." }
        },
    )
}

fn file_link(f: &FileView) -> Markup {
    html! { a href=(format!("/files/{}", f.file.id)) { (f.file.file_name) } }
}

fn tenant_link(slug: &str) -> Markup {
    html! { a href=(format!("/tenants/{slug}")) { (slug) } }
}

fn files_table(files: &[FileView], with_tenant: bool, live: bool) -> Markup {
    html! {
        table.files {
            thead { tr {
                th { "id" }
                @if with_tenant { th { "tenant" } }
                th { "file" } th { "state" } th { "rows done / total" } th { "progress" }
                th title="rows handled per second since the file was received" { "rows/s (mean)" } th { "imported" } th { "failed" } th { "email" } th { "received" }
            } }
            tbody {
                @for f in files {
                    tr id=(format!("file-{}", f.file.id)) class=(format!("state-{}", f.status.split(' ').next().unwrap_or(""))) {
                        td { (f.file.id) }
                        @if with_tenant { td { (tenant_link(&f.tenant)) } }
                        td { (file_link(f)) }
                        td.status { (f.status) }
                        td.rows-done {
                            (f.rows_done) " / "
                            @match f.file.rows_total { Some(t) => (t), None => "?" }
                        }
                        td {
                            @if let Some(p) = f.percent() {
                                progress max="100" value=(p) { (p) "%" } " " (p) "%"
                            } @else { "–" }
                        }
                        td.rate { @match f.rows_per_sec { Some(r) => (format!("{r:.0}")), None => "–" } }
                        td { (f.file.rows_imported()) }
                        td { (f.file.rows_failed) }
                        td { (f.file.notify_status) }
                        td { (when(f.file.received_at)) }
                    }
                }
                @if files.is_empty() {
                    tr { td colspan="11" { @if live { "No file is being imported." } @else { "None." } } }
                }
            }
        }
    }
}

/// The overview page: counts, files in progress and of the last hour, the queue, workers.
pub fn overview(op: &Operator, o: &Overview) -> Markup {
    page(
        "Overview",
        Some(op),
        html! {
            noscript { p.hint { "Live updates need JavaScript; reload the page to refresh it." } }
            div hx-ext="sse" sse-connect="/events" {
                div #live sse-swap="overview" { (overview_live(o)) }
            }
        },
    )
}

/// The overview's live part (what the `overview` server-sent event carries).
pub fn overview_live(o: &Overview) -> Markup {
    html! {
        p.updated { "As of " span #generated-at { (when(o.generated_at)) } }
        ul.counts {
            li { a href="/dead-letters" { strong #dead-letter-count { (o.dead_letters) } " dead letter(s) to replay" } }
            li { a href="/held" { strong #awaiting-count { (o.awaiting_decision) } " file(s) held by the mass-deactivation guard, waiting for approve or reject" } }
            li { a href="/held" { strong #held-count { (o.held) } " file(s) with mail held" } }
            li { strong { (o.failed_rows_last_hour) } " failed row(s) and " strong { (o.failed_files_last_hour) } " failed file(s) in the last hour" }
            li { strong { (o.workers.len()) } " live worker(s); dispatcher: "
                @match &o.dispatcher { Some(d) => (d), None => "nobody leads (no worker with DISPATCH=true connected)" } }
        }
        h2 { "In progress" }
        div #in-progress { (files_table(&o.in_progress, true, true)) }
        h2 { "Last hour" }
        div #last-hour { (files_table(&o.last_hour, true, false)) }
        h2 { "Chunk queue per tenant" }
        table {
            thead { tr { th { "tenant" } th { "waiting" } th { "in flight" } th { "dead" } } }
            tbody {
                @for q in &o.queue {
                    tr { td { (tenant_link(&q.tenant)) } td { (q.waiting) } td { (q.in_flight) } td { (q.dead) } }
                }
                @if o.queue.is_empty() { tr { td colspan="4" { "The chunk queue is empty." } } }
            }
        }
        h2 { "Workers" }
        table {
            thead { tr { th { "worker" } th { "concurrency" } th { "last seen" } } }
            tbody {
                @for w in &o.workers {
                    tr { td { (w.name) } td { (w.concurrency) } td { (w.seen_secs_ago) " s ago" } }
                }
                @if o.workers.is_empty() { tr { td colspan="3" { "No worker seen in the last minute." } } }
            }
        }
    }
}

/// What replaces the live part when the database cannot answer.
pub fn live_error(message: &str) -> Markup {
    html! { p.notice { "The database could not answer: " (message) } }
}

fn mail_settings(t: &TenantSummary) -> Markup {
    html! {
        @match &t.mail_problem {
            Some(p) => span.problem { (p) },
            None => "ok",
        }
    }
}

fn folder(t: &TenantSummary) -> Markup {
    html! {
        @match &t.folder {
            None => "not looked at by ingest yet",
            Some(f) => @match &f.problem {
                Some(p) => span.problem { "problem since " (when(f.since)) ": " (p) },
                None => { "ok (" (f.path) ")" },
            },
        }
    }
}

/// The tenants list.
pub fn tenants(op: &Operator, list: &[TenantSummary]) -> Markup {
    page(
        "Tenants",
        Some(op),
        html! {
            table {
                thead { tr {
                    th { "tenant" } th { "name" } th { "files" } th { "in progress" } th { "failed files" }
                    th { "rows imported" } th { "rows failed" } th { "mail held" } th { "mail settings" } th { "drop folder" }
                } }
                tbody {
                    @for t in list {
                        tr {
                            td { (tenant_link(&t.tenant.slug)) } td { (t.tenant.name) }
                            td { (t.totals.files) } td { (t.totals.open) } td { (t.totals.failed) }
                            td { (t.totals.rows_imported) } td { (t.totals.rows_failed) } td { (t.totals.held) }
                            td { (mail_settings(t)) } td { (folder(t)) }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="10" { "No tenant yet (muictl tenant create)." } } }
                }
            }
        },
    )
}

fn replay_form(
    op: &Operator,
    tenant: &str,
    id: Option<i64>,
    file: Option<i64>,
    label: &str,
) -> Markup {
    html! {
        form.inline method="post" action="/dead-letters/replay" {
            input type="hidden" name="csrf" value=(op.csrf_token());
            input type="hidden" name="tenant" value=(tenant);
            @if let Some(i) = id { input type="hidden" name="id" value=(i); }
            @if let Some(f) = file { input type="hidden" name="file" value=(f); }
            button type="submit" { (label) }
        }
    }
}

fn dead_letter_table(op: &Operator, letters: &[DeadLetter]) -> Markup {
    html! {
        table.dead-letters {
            thead { tr {
                th { "id" } th { "tenant" } th { "file" } th { "message" } th { "why (broker)" }
                th { "attempts" } th { "died" } th { "last error" } th { "replayed" } th { "" }
            } }
            tbody {
                @for d in letters {
                    tr id=(format!("dead-letter-{}", d.id)) {
                        td { (d.id) }
                        td { @match &d.tenant { Some(t) => (tenant_link(t)), None => "?" } }
                        td { @match d.file_id {
                            Some(f) => a href=(format!("/files/{f}")) { (f) " " (d.file_name.as_deref().unwrap_or("?")) },
                            None => "?",
                        } }
                        td { @match (d.queue.as_deref(), d.chunk_no) {
                            (Some("chunks"), Some(n)) => { "chunk " (n) },
                            (Some("notify"), Some(n)) => { "failures of chunk " (n) },
                            (Some("notify"), None) => "file finished",
                            (Some(q), _) => (q),
                            (None, _) => "?",
                        } }
                        td { (d.reason) }
                        td { (d.attempts) }
                        td { (when(d.died_at)) }
                        td.error { (d.last_error.as_deref().unwrap_or("")) }
                        td { @match d.replayed_at { Some(t) => (when(t)), None => "–" } }
                        td {
                            @if let (None, Some(t)) = (d.replayed_at, &d.tenant) {
                                (replay_form(op, t, Some(d.id), None, "Replay"))
                                @if let Some(f) = d.file_id { (replay_form(op, t, None, Some(f), "Replay file")) }
                            }
                        }
                    }
                }
                @if letters.is_empty() { tr { td colspan="10" { "No dead letter." } } }
            }
        }
    }
}

/// One tenant: settings, drop folder, totals, latest files, dead letters.
pub fn tenant(op: &Operator, p: &TenantPage) -> Markup {
    let t = &p.summary.tenant;
    page(
        &format!("Tenant {}", t.slug),
        Some(op),
        html! {
            dl.settings {
                dt { "name" } dd { (t.name) }
                dt { "Reply-to Admin Email Address" } dd { (t.reply_to_email.as_deref().unwrap_or("(none)")) }
                dt { "Failed Import Email" } dd { @if t.failed_import_emails.is_empty() { "(none)" } @else { (t.failed_import_emails.join(", ")) } }
                dt { "mail settings" } dd { (mail_settings(&p.summary)) }
                dt { "archive on inactive" } dd { (if t.archive_on_inactive { "on" } else { "off" }) }
                dt { "fields suffixed on archive" } dd { (t.archive_suffix_fields.join(", ")) }
                dt { "login sources" } dd { (p.login_sources.join(", ")) }
                dt { "user types" } dd { (p.user_types.join(", ")) }
                dt { "drop folder" } dd { (folder(&p.summary)) }
                dt { "created" } dd { (when(t.created_at)) }
            }
            h2 { "Totals" }
            p {
                (p.summary.totals.files) " file(s), " (p.summary.totals.open) " in progress, "
                (p.summary.totals.failed) " failed as a whole; " (p.summary.totals.rows_imported) " row(s) imported, "
                (p.summary.totals.rows_failed) " failed; " (p.summary.totals.held) " report(s) held."
            }
            h2 { "Latest files" }
            (files_table(&p.files, false, false))
            h2 { "Dead letters" }
            @if !p.dead_letters.is_empty() {
                p { (replay_form(op, &t.slug, None, None, "Replay all of this tenant's dead letters")) }
            }
            (dead_letter_table(op, &p.dead_letters))
        },
    )
}

fn filter_url(id: i64, code: Option<&str>, column: Option<&str>, page: i64) -> String {
    let mut s = format!("/files/{id}?page={page}");
    for (k, v) in [("code", code), ("column", column)] {
        if let Some(v) = v {
            s.push_str(&format!("&{k}="));
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    s.push(b as char);
                } else {
                    s.push_str(&format!("%{b:02X}"));
                }
            }
        }
    }
    s
}

/// One file: counts, timeline, report, failures table, dead letters.
pub fn file(op: &Operator, p: &FilePage) -> Markup {
    let f = &p.file;
    let t = &p.failures;
    page(
        &format!("File {}", f.file.id),
        Some(op),
        html! {
            dl.settings {
                dt { "name" } dd #file-name { (f.file.file_name) }
                dt { "tenant" } dd { (tenant_link(&f.tenant)) }
                dt { "state" } dd #file-state { (f.status) }
                dt { "rows" } dd { (f.rows_done) " handled of " @match f.file.rows_total { Some(n) => (n), None => "?" }
                    "; chunks " (f.file.chunks_done) " of " @match f.file.total_chunks { Some(n) => (n), None => "?" } }
                dt { "imported" } dd { (f.file.rows_inserted) " created, " (f.file.rows_updated) " changed, " (f.file.rows_unchanged) " unchanged" @if f.file.rows_superseded > 0 { ", " (f.file.rows_superseded) " left as a later file had set them" } }
                dt { "failed rows" } dd #rows-failed { (f.file.rows_failed) }
                dt { "archive" } dd { (f.file.users_archived) " user(s) archived, " (f.file.users_reactivated) " reactivated, " (f.file.permits_released) " permit(s) released" }
                @if let Some(m) = &f.file.error_message {
                    dt { "file-level error" } dd.problem { (f.file.error_code.as_deref().unwrap_or("")) ": " (m) }
                }
                dt { "email" } dd #notify-status { (f.file.notify_status) }
                @if let Some(d) = &f.file.notify_detail { dt { "email detail" } dd #notify-detail { (d) } }
                @for n in &f.file.notices { dt { "notice" } dd { (n) } }
                dt { "size" } dd { (p.detail.size_bytes) " bytes, " (p.detail.encoding.as_deref().unwrap_or("encoding unknown"))
                    ", delimiter " (p.detail.delimiter.as_deref().unwrap_or("?")) }
                dt { "SHA-256" } dd { code { (p.detail.sha256) } }
                dt { "in bak/ as" } dd { (f.file.archived_name.as_deref().unwrap_or("(not archived yet)")) }
                @if f.file.dry_run {
                    dt { "dry run" } dd #dry-run { "yes: checked like an import, nothing changed (the name ends in .validate.csv)" }
                }
                @if let Some(h) = &f.file.hold {
                    dt { "mass-deactivation guard" } dd #hold {
                        (h) ": would deactivate or archive " (f.file.hold_users.unwrap_or(0)) " of "
                        (f.file.hold_active_users.unwrap_or(0)) " active user(s)"
                        @if f.file.is_held() {
                            " " (decide_form(op, &f.tenant, f.file.id, "approve", "Approve: import it as uploaded"))
                            " " (decide_form(op, &f.tenant, f.file.id, "reject", "Reject: import nothing, mail the tenant"))
                        }
                    }
                }
                dt { "trace id" } dd #trace-id {
                    @match &f.file.trace_id { Some(t) => code { (t) }, None => "none (traces were not exported when it arrived)" }
                }
            }
            h2 { "Timeline" }
            table {
                thead { tr { th { "step" } th { "when" } th { "after upload" } } }
                tbody {
                    @for s in &p.timeline {
                        tr {
                            td { (s.what) }
                            td { @match s.at { Some(t) => (when(t)), None => "not yet" } }
                            td { @match s.after_secs { Some(x) => (secs(x)), None => "–" } }
                        }
                    }
                }
            }
            h2 { "Failed rows" }
            p { a #download-csv href=(p.failures_csv) download { "Download the failures CSV (as mailed)" } }
            form.filter method="get" action=(format!("/files/{}", f.file.id)) {
                label { "code " select name="code" {
                    option value="" { "any" }
                    @for c in &t.codes { option value=(c) selected[t.code.as_deref() == Some(c.as_str())] { (c) } }
                } }
                label { " column " select name="column" {
                    option value="" { "any" }
                    @for c in &t.columns { option value=(c) selected[t.column.as_deref() == Some(c.as_str())] { (c) } }
                } }
                " " button type="submit" { "Filter" }
            }
            p #failures-summary { (t.total) " matching row(s); page " (t.page) " of " (t.pages) }
            table.failures {
                thead { tr {
                    th { "row" }
                    @for h in &p.header { th { (h) } }
                    th { "error_code" } th { "reason" }
                } }
                tbody {
                    @for r in &t.rows {
                        tr {
                            td { (r.row) }
                            @for i in 0..p.header.len().max(r.fields.len()) {
                                td { (r.fields.get(i).map(String::as_str).unwrap_or("")) }
                            }
                            td { (r.errors.iter().map(|e| e.code.as_str()).collect::<Vec<_>>().join("; ")) }
                            td { (r.errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>().join("; ")) }
                        }
                    }
                }
            }
            nav.pages {
                @if t.page > 1 { a rel="prev" href=(filter_url(f.file.id, t.code.as_deref(), t.column.as_deref(), t.page - 1)) { "← previous" } " " }
                @if t.page < t.pages { a rel="next" href=(filter_url(f.file.id, t.code.as_deref(), t.column.as_deref(), t.page + 1)) { "next →" } }
            }
            h2 { "Dead letters" }
            (dead_letter_table(op, &p.dead_letters))
        },
    )
}

/// The dead letters list.
pub fn dead_letters(op: &Operator, p: &DeadLettersPage) -> Markup {
    page(
        "Dead letters",
        Some(op),
        html! {
            p.hint { "A message RabbitMQ dead-lettered: delivery_limit means it kept failing, rejected that it can never succeed. Fix the cause, then replay: chunks already imported are skipped and the tenant gets one email per file." }
            form.filter method="get" action="/dead-letters" {
                label { "tenant " input type="text" name="tenant" value=(p.tenant.as_deref().unwrap_or("")); }
                label { " " input type="checkbox" name="replayed" value="1" checked[p.include_replayed]; " replayed ones too" }
                " " button type="submit" { "Show" }
            }
            @if let Some(t) = &p.tenant {
                @if p.letters.iter().any(|d| d.replayed_at.is_none()) {
                    p { (replay_form(op, t, None, None, "Replay all of this tenant's dead letters")) }
                }
            }
            (dead_letter_table(op, &p.letters))
        },
    )
}

/// What a replay did.
pub fn replayed(op: &Operator, r: &ReplayResult) -> Markup {
    page(
        "Replay",
        Some(op),
        html! {
            p #replay-result {
                "Tenant " (tenant_link(&r.tenant)) ", " (r.scope) ": " (r.replayed.len()) " dead letter(s) replayed"
                @if !r.replayed.is_empty() {
                    " (" (r.replayed.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")) "); a running worker or ingest publishes them within about a second"
                } "."
            }
            @if !r.skipped.is_empty() {
                ul { @for (id, why) in &r.skipped { li { "dead letter " (id) " skipped: " (why) } } }
            }
            p { a href="/" { "Back to the overview" } " · " a href=(format!("/dead-letters?tenant={}", r.tenant)) { "this tenant's dead letters" } }
        },
    )
}

fn decide_form(op: &Operator, tenant: &str, file: i64, decision: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action="/held/decide" {
            input type="hidden" name="csrf" value=(op.csrf_token());
            input type="hidden" name="tenant" value=(tenant);
            input type="hidden" name="file" value=(file);
            input type="hidden" name="decision" value=(decision);
            button type="submit" class=(format!("decide-{decision}")) { (label) }
        }
    }
}

/// Files held before any change, waiting for a decision; files whose mail is held.
pub fn held(op: &Operator, p: &HeldPage) -> Markup {
    page(
        "Held",
        Some(op),
        html! {
            h2 { "Waiting for approve or reject" }
            p.hint { "The mass-deactivation guard held these files before any change: each would deactivate or archive more of its tenant's active users than the tenant's threshold allows (muictl tenant set --guard-percent / --guard-min-users). The tenant was mailed the list. Approve imports the file as uploaded; reject imports nothing and mails the tenant. The tenant's later files wait behind a held one. Both are the same as muictl files approve|reject, and doing either twice does nothing the second time." }
            table #awaiting {
                thead { tr { th { "id" } th { "tenant" } th { "file" } th { "would deactivate" } th { "active users" } th { "received" } th { "decide" } } }
                tbody {
                    @for f in &p.awaiting_decision {
                        tr id=(format!("held-{}", f.file.id)) {
                            td { (f.file.id) } td { (tenant_link(&f.tenant)) } td { (file_link(f)) }
                            td { (f.file.hold_users.unwrap_or(0)) } td { (f.file.hold_active_users.unwrap_or(0)) }
                            td { (when(f.file.received_at)) }
                            td {
                                (decide_form(op, &f.tenant, f.file.id, "approve", "Approve"))
                                " " (decide_form(op, &f.tenant, f.file.id, "reject", "Reject"))
                            }
                        }
                    }
                    @if p.awaiting_decision.is_empty() { tr { td colspan="7" { "No file waits for a decision." } } }
                }
            }
            h2 { "Mail held" }
            p.hint { "A report is held when the tenant lacks mail settings (set them with muictl tenant set) or the mail server refused the address. The report is kept: the failures CSV can be downloaded from the file's page." }
            table #held-mail {
                thead { tr { th { "id" } th { "tenant" } th { "file" } th { "state" } th { "failed rows" } th { "why" } th { "received" } } }
                tbody {
                    @for h in &p.held_mail {
                        tr {
                            td { (h.file.file.id) } td { (tenant_link(&h.file.tenant)) } td { (file_link(&h.file)) }
                            td { (h.file.status) } td { (h.file.file.rows_failed) } td.problem { (h.why) } td { (when(h.file.file.received_at)) }
                        }
                    }
                    @if p.held_mail.is_empty() { tr { td colspan="7" { "No report is held." } } }
                }
            }
        },
    )
}

/// What an approve or reject did.
pub fn decided(op: &Operator, r: &DecisionResult) -> Markup {
    let verb = if r.decision == "approve" {
        "approved"
    } else {
        "rejected"
    };
    page(
        "Decision",
        Some(op),
        html! {
            p #decision-result {
                "Tenant " (tenant_link(&r.tenant)) ", file " a href=(format!("/files/{}", r.file)) { (r.file) } ": "
                @if r.done_now {
                    (verb) " now."
                    @if r.decision == "approve" { " Its chunks go to the workers; the tenant's later files follow it." }
                    @else { " Nothing of it is imported; the tenant is mailed why." }
                } @else {
                    "it had been " (verb) " already; nothing changed."
                }
            }
            p { a href="/held" { "Back to the held files" } " · " a href="/" { "the overview" } }
        },
    )
}

/// Every file that waits on something, what on, and an End button for a registered one
/// nothing reads.
pub fn waiting(op: &Operator, p: &WaitingPage) -> Markup {
    page(
        "Waiting",
        Some(op),
        html! {
            p.hint { "Every file not finished, or whose report did not go out, with what it waits on and what resolves it (the same as muictl files waiting). By design every file ends by itself; one listed here for long is a fault to look into. A registered file that no ingest reads can be ended here (the same as muictl files end): the tenant is mailed your reason, rows queued from it before are kept, and its later files follow." }
            table #waiting {
                thead { tr { th { "id" } th { "tenant" } th { "file" } th { "state" } th { "report" } th { "received" } th { "waits on" } th { "end" } } }
                tbody {
                    @for w in &p.files {
                        tr id=(format!("waiting-{}", w.id)) {
                            td { (w.id) } td { (tenant_link(&w.tenant)) }
                            td { a href=(format!("/files/{}", w.id)) { (w.file_name) } }
                            td { (w.state.to_string()) } td { (w.notify_status.to_string()) }
                            td { (when(w.received_at)) } td.problem { (w.why) }
                            td {
                                @if w.can_end {
                                    form.inline method="post" action="/waiting/end" {
                                        input type="hidden" name="csrf" value=(op.csrf_token());
                                        input type="hidden" name="tenant" value=(w.tenant);
                                        input type="hidden" name="file" value=(w.id);
                                        input type="text" name="reason" required placeholder="why (goes to the tenant)";
                                        button type="submit" class="end-file" { "End" }
                                    }
                                }
                            }
                        }
                    }
                    @if p.files.is_empty() { tr { td colspan="8" { "No file waits on anything." } } }
                }
            }
        },
    )
}

/// What ending a file did.
pub fn ended(op: &Operator, tenant: &str, e: &mui_shared::ending::Ended) -> Markup {
    page(
        "Ended",
        Some(op),
        html! {
            p #end-result {
                "Tenant " (tenant_link(tenant)) ", file " a href=(format!("/files/{}", e.file)) { (e.file) } ": ended. "
                @if e.kept_rows == 0 { "Nothing of it was imported; " }
                @else { "The " (e.kept_rows) " data rows queued before are imported and reported, the rest is not; " }
                "the tenant is mailed why, and its later files follow."
            }
            p { a href="/waiting" { "Back to the waiting files" } " · " a href="/" { "the overview" } }
        },
    )
}
