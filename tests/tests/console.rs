//! The operator console (`mui-console`): its pages and actions against a real database
//! (sessions, CSRF, escaping, pagination, JSON twins, replay kept to the tenant it names),
//! and a real Chromium, driven headless through chromedriver, watching the real pipeline.

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use diesel::prelude::*;
use mui_console::{AppState, ConsoleArgs, ConsoleConfig};
use mui_shared::amqp::Topology;
use mui_shared::codes::{RowError, RowErrorCode};
use mui_shared::deadletters;
use mui_shared::domain::{ImportFileId, TenantId};
use mui_shared::messages::{self, ChunkRef, WorkMessage};
use mui_shared::schema::row_failures;
use mui_tests::{register_file, AppOptions, TestEnv};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const TOKEN: &str = "console-test-token-0123456789";
/// A file name that would open an `<img>` with a script if inserted unescaped.
const HOSTILE_NAME: &str = "\"><img src=x onerror=window.__xss=1>.csv";
/// A cell value that would run a script if inserted unescaped.
const HOSTILE_CELL: &str = "<script>window.__xss=2</script>";

fn config(database_url: &str) -> ConsoleConfig {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsoleArgs,
    }
    Cli::parse_from([
        "mui-console",
        "--addr",
        "127.0.0.1:0",
        "--database-url",
        database_url,
        "--token",
        TOKEN,
    ])
    .args
    .into_config()
    .unwrap()
}

/// The console's router on the test's database.
pub(crate) struct Console {
    router: axum::Router,
    _shutdown: CancellationToken,
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Console {
    pub(crate) fn new(database_url: &str) -> Self {
        let shutdown = CancellationToken::new();
        let state = AppState::new(&config(database_url), shutdown.clone());
        Self {
            router: mui_console::router(state),
            _shutdown: shutdown,
        }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        uri: &str,
        cookie: Option<&str>,
        form: Option<&str>,
        accept_json: bool,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        if accept_json {
            req = req.header(header::ACCEPT, "application/json");
        }
        let req = match form {
            Some(f) => req
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(f.to_owned())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub(crate) async fn get(&self, uri: &str, cookie: &str) -> Reply {
        self.call(Method::GET, uri, Some(cookie), None, false).await
    }

    pub(crate) async fn json(&self, uri: &str, cookie: &str) -> serde_json::Value {
        let r = self.call(Method::GET, uri, Some(cookie), None, true).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    /// Logs in; returns the `Cookie` header value and the session's CSRF token.
    pub(crate) async fn login(&self) -> (String, String) {
        let r = self
            .call(
                Method::POST,
                "/login",
                None,
                Some(&format!("token={TOKEN}")),
                false,
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let set = r.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(set.contains("HttpOnly"), "{set}");
        assert!(set.contains("SameSite=Strict"), "{set}");
        let cookie = set.split(';').next().unwrap().to_owned();
        let page = self.get("/tenants", &cookie).await;
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_owned();
        (cookie, csrf)
    }
}

fn failure(
    row: u64,
    fields: &[&str],
    code: RowErrorCode,
    column: &str,
) -> (i64, serde_json::Value, serde_json::Value) {
    let errors = vec![RowError {
        code,
        column: Some(column.to_owned()),
        message: format!("`{column}` is wrong on row {row}"),
    }];
    (
        row as i64,
        serde_json::to_value(fields).unwrap(),
        serde_json::to_value(errors).unwrap(),
    )
}

fn store_failures(
    conn: &mut PgConnection,
    file: i64,
    rows: Vec<(i64, serde_json::Value, serde_json::Value)>,
) {
    for (row, fields, errors) in rows {
        diesel::insert_into(row_failures::table)
            .values((
                row_failures::file_id.eq(file),
                row_failures::row_number.eq(row),
                row_failures::fields.eq(fields),
                row_failures::errors.eq(errors),
            ))
            .execute(conn)
            .unwrap();
    }
}

/// Records a dead letter for a chunk of `file` of `tenant` as the notifier does.
fn dead_chunk(conn: &mut PgConnection, tenant: i64, file: i64, chunk_no: u32) -> i64 {
    let payload = messages::encode(&WorkMessage::QueuedChunkV1(ChunkRef {
        file_id: ImportFileId(file),
        tenant_id: TenantId(tenant),
        chunk_no,
    }))
    .unwrap();
    deadletters::record(conn, &Topology::new("unused"), &payload, None)
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_needs_a_session_every_action_its_csrf_token_and_tenant_text_stays_text() {
    let env = TestEnv::new(AppOptions::default()).unwrap();
    let acme = env.tenant("acme").unwrap();
    let beta = env.tenant("beta").unwrap();
    let mut conn = env.db.conn();
    let header = ["unique_id", "login_source", "first_name", "email"];
    let file = register_file(&mut conn, acme.id, HOSTILE_NAME, &header, 3, 70).unwrap();
    // 60 failed rows: 45 with an unknown login source, 15 with a bad email; one cell hostile.
    let mut rows = Vec::new();
    for i in 0..60u64 {
        let first = if i == 7 {
            HOSTILE_CELL.to_owned()
        } else {
            format!("Name {i}")
        };
        rows.push(if i % 4 == 3 {
            failure(
                i + 2,
                &[&format!("u{i}"), "sso", &first, "not-an-email"],
                RowErrorCode::InvalidEmail,
                "email",
            )
        } else {
            failure(
                i + 2,
                &[&format!("u{i}"), "bogus", &first, ""],
                RowErrorCode::UnknownLoginSource,
                "login_source",
            )
        });
    }
    store_failures(&mut conn, file, rows);
    let beta_file = register_file(&mut conn, beta.id, "beta.csv", &header, 2, 4).unwrap();
    let acme_dead = dead_chunk(&mut conn, acme.id, file, 1);
    let beta_dead = dead_chunk(&mut conn, beta.id, beta_file, 0);

    let console = Console::new(&env.db.url);

    // No session: 401 everywhere, the login form for a browser, JSON for a script.
    for uri in [
        "/",
        "/tenants",
        "/tenants/acme",
        &format!("/files/{file}"),
        &format!("/files/{file}/failures.csv"),
        "/dead-letters",
        "/held",
        "/events",
    ] {
        let r = console.call(Method::GET, uri, None, None, false).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert!(r.body.contains("name=\"token\""), "{uri}: the login form");
        assert!(!r.body.contains("acme"), "{uri} shows nothing of a tenant");
    }
    let r = console.call(Method::GET, "/", None, None, true).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("\"error\""), "{}", r.body);
    let r = console
        .call(
            Method::GET,
            "/",
            Some("mui_console_session=forged"),
            None,
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a made-up session");
    let r = console
        .call(
            Method::POST,
            "/login",
            None,
            Some("token=wrong-token-wrong-token"),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.get(header::SET_COOKIE).is_none());
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            None,
            Some(&format!("tenant=acme&id={acme_dead}")),
            false,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "an action without a session"
    );

    let (cookie, csrf) = console.login().await;

    // The overview, with the security headers.
    let r = console.get("/", &cookie).await;
    assert_eq!(r.status, StatusCode::OK);
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
    assert!(r.body.contains("sse-connect=\"/events\""));
    assert!(
        r.body.contains(&format!("id=\"file-{file}\"")),
        "the file in progress"
    );
    assert!(
        !r.body.contains("<img src=x"),
        "the file name is not markup"
    );
    assert!(r
        .body
        .contains("&quot;&gt;&lt;img src=x onerror=window.__xss=1&gt;.csv"));
    let o = console.json("/?format=json", &cookie).await;
    let listed = o["in_progress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == file)
        .unwrap();
    assert_eq!(listed["file_name"], HOSTILE_NAME);
    assert_eq!(listed["tenant"], "acme");
    assert_eq!(listed["status"], "dead-lettered");
    assert_eq!(o["dead_letters"], 2);

    // A file: escaped cells, pagination, filters.
    let r = console.get(&format!("/files/{file}"), &cookie).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.body.contains("<script>window"), "a cell is not markup");
    assert!(r
        .body
        .contains("&lt;script&gt;window.__xss=2&lt;/script&gt;"));
    assert!(
        r.body.contains("60 matching row(s); page 1 of 2"),
        "pagination"
    );
    let page2 = console
        .json(&format!("/files/{file}?page=2&format=json"), &cookie)
        .await;
    assert_eq!(page2["failures"]["total"], 60);
    assert_eq!(page2["failures"]["rows"].as_array().unwrap().len(), 10);
    assert_eq!(page2["failures"]["rows"][0]["row"], 52);
    assert_eq!(page2["file"]["status"], "dead-lettered");
    assert_eq!(page2["header"], serde_json::json!(header));
    let by_code = console
        .json(
            &format!("/files/{file}?code=invalid_email&format=json"),
            &cookie,
        )
        .await;
    assert_eq!(by_code["failures"]["total"], 15);
    assert_eq!(
        by_code["failures"]["codes"],
        serde_json::json!(["invalid_email", "unknown_login_source"])
    );
    let by_column = console
        .json(
            &format!("/files/{file}?column=login_source&format=json"),
            &cookie,
        )
        .await;
    assert_eq!(by_column["failures"]["total"], 45);
    let both = console
        .json(
            &format!("/files/{file}?column=login_source&code=invalid_email&format=json"),
            &cookie,
        )
        .await;
    assert_eq!(both["failures"]["total"], 0);
    // The CSV as muictl prints it and the report attaches it.
    let csv = console
        .get(&format!("/files/{file}/failures.csv"), &cookie)
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    let expected = mui_shared::failures::load_file(&mut conn, ImportFileId(file))
        .unwrap()
        .unwrap()
        .csv()
        .unwrap();
    assert_eq!(csv.body.as_bytes(), expected.as_slice());
    assert!(csv.headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .starts_with("attachment;"));
    // Bad ids say what was wrong.
    let r = console.get("/files/abc", &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body.contains("\"abc\" is not a positive whole number"),
        "{}",
        r.body
    );
    let r = console.get("/files/999999", &cookie).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.contains("no file with id 999999"));
    let r = console.get("/files/1?page=0", &cookie).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = console.get("/tenants/nobody", &cookie).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Tenants, held, dead letters.
    let tenants = console.json("/tenants?format=json", &cookie).await;
    assert_eq!(tenants.as_array().unwrap().len(), 2);
    assert_eq!(
        tenants[0]["totals"]["rows_failed"], 0,
        "counts come from the files' rows"
    );
    let t = console.json("/tenants/acme?format=json", &cookie).await;
    assert_eq!(t["tenant"]["slug"], "acme");
    assert_eq!(t["login_sources"], serde_json::json!(["local", "sso"]));
    assert_eq!(t["files"][0]["id"], file);
    assert_eq!(
        t["dead_letters"].as_array().unwrap().len(),
        1,
        "only acme's"
    );
    let r = console.get("/tenants/acme", &cookie).await;
    assert!(
        r.body.contains("&quot;&gt;&lt;img"),
        "escaped on the tenant page too"
    );
    assert!(!r.body.contains("<img src=x"));
    let held = console.json("/held?format=json", &cookie).await;
    assert_eq!(
        held,
        serde_json::json!({"awaiting_decision": [], "held_mail": []})
    );
    // A report held (as the notifier records it), with a reason quoting a hostile address.
    mui_shared::files::report_status(
        &mut conn,
        ImportFileId(beta_file),
        mui_shared::files::NotifyStatus::Held,
        Some("the server refused <it@beta.example.org>"),
    )
    .unwrap();
    let held = console.json("/held?format=json", &cookie).await;
    let mail = &held["held_mail"];
    assert_eq!(mail.as_array().unwrap().len(), 1);
    assert_eq!(mail[0]["file"]["id"], beta_file);
    assert_eq!(mail[0]["file"]["tenant"], "beta");
    assert_eq!(mail[0]["why"], "the server refused <it@beta.example.org>");
    assert_eq!(held["awaiting_decision"], serde_json::json!([]));
    let r = console.get("/held", &cookie).await;
    assert!(r
        .body
        .contains("the server refused &lt;it@beta.example.org&gt;"));
    assert_eq!(console.json("/?format=json", &cookie).await["held"], 1);
    let dl = console
        .json("/dead-letters?tenant=beta&format=json", &cookie)
        .await;
    assert_eq!(dl["letters"].as_array().unwrap().len(), 1);
    assert_eq!(dl["letters"][0]["id"], beta_dead);
    let r = console.get("/dead-letters", &cookie).await;
    assert!(r.body.contains(&format!("id=\"dead-letter-{acme_dead}\"")));
    assert!(!r.body.contains("<img src=x"));

    // Actions: refused without the session's CSRF token, or with another session's.
    let (_, other_csrf) = console.login().await;
    assert_ne!(csrf, other_csrf);
    for form in [
        format!("tenant=acme&id={acme_dead}"),
        format!("tenant=acme&id={acme_dead}&csrf="),
        format!("tenant=acme&id={acme_dead}&csrf={other_csrf}"),
    ] {
        let r = console
            .call(
                Method::POST,
                "/dead-letters/replay",
                Some(&cookie),
                Some(&form),
                false,
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{form}");
        assert!(r.body.contains("CSRF"), "{}", r.body);
    }
    let pending = |conn: &mut PgConnection| deadletters::list(conn, None, false).unwrap().len();
    assert_eq!(pending(&mut conn), 2, "nothing replayed by refused actions");

    // No action touches a tenant other than the one it names.
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme&id={beta_dead}")),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r
        .body
        .contains(&format!("tenant \"acme\" has no dead letter {beta_dead}")));
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme&file={beta_file}")),
            true,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let none: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        none["replayed"],
        serde_json::json!([]),
        "beta's file is not acme's"
    );
    assert_eq!(pending(&mut conn), 2);
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme&id=x")),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Replay one file's dead letters; a second click does nothing more.
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme&file={file}")),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("1 dead letter(s) replayed"), "{}", r.body);
    let outbox = |conn: &mut PgConnection| -> i64 {
        mui_shared::schema::outbox::table
            .count()
            .get_result(conn)
            .unwrap()
    };
    assert_eq!(
        outbox(&mut conn),
        1,
        "the chunk went back through the outbox"
    );
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme&id={acme_dead}")),
            true,
        )
        .await;
    let again: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(again["replayed"], serde_json::json!([]));
    assert!(again["skipped"][0][1]
        .as_str()
        .unwrap()
        .starts_with("already replayed"));
    let r = console
        .call(
            Method::POST,
            "/dead-letters/replay",
            Some(&cookie),
            Some(&format!("csrf={csrf}&tenant=acme")),
            true,
        )
        .await;
    let tenant_again: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(tenant_again["replayed"], serde_json::json!([]));
    assert_eq!(outbox(&mut conn), 1, "replayed once");
    assert_eq!(pending(&mut conn), 1, "beta's dead letter untouched");
    // The tenant-wide replay, by a script with the bearer token (no cookie, no CSRF).
    let req = Request::post("/dead-letters/replay")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::ACCEPT, "application/json")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("tenant=beta"))
        .unwrap();
    let res = console.router.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(pending(&mut conn), 0);
    assert_eq!(outbox(&mut conn), 2);

    // Logging out ends the session (with its CSRF token).
    let r = console
        .call(
            Method::POST,
            "/logout",
            Some(&cookie),
            Some("csrf=nope"),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = console
        .call(
            Method::POST,
            "/logout",
            Some(&cookie),
            Some(&format!("csrf={csrf}")),
            false,
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let r = console.get("/", &cookie).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[test]
fn refuses_to_listen_beyond_loopback_without_a_token_and_short_tokens() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsoleArgs,
    }
    let parse = |args: &[&str]| {
        let mut all = vec!["mui-console"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().args.into_config()
    };
    let e = parse(&["--addr", "0.0.0.0:8080"]).unwrap_err().to_string();
    assert!(
        e.contains("not a loopback address") && e.contains("MUI_CONSOLE_TOKEN"),
        "{e}"
    );
    let e = parse(&["--addr", "0.0.0.0:8080", "--token", "short"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("too short"), "{e}");
    let c = parse(&["--addr", "0.0.0.0:8080", "--token", TOKEN]).unwrap();
    assert!(!c.token_generated);
    let c = parse(&["--addr", "127.0.0.1:8080"]).unwrap();
    assert!(c.token_generated, "a one-time token on loopback");
    assert!(c.token.expose().len() >= 32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let c = parse(&[
        "--addr",
        "[::]:8080",
        "--token-file",
        path.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(c.token.expose(), TOKEN);
    assert!(!format!("{c:?}").contains(TOKEN), "Debug hides the token");
    let e = parse(&["--token-file", "/nonexistent/token"]).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/token"), "{e:#}");
}

mod browser;
