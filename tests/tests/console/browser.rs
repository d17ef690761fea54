//! A real Chromium (Debian's `chromium`, driven headless through `chromedriver` by
//! fantoccini) against the real pipeline and the console: log in, watch an import's
//! progress change on the overview without a reload, open the file, fetch the failures CSV
//! through the page's download link and compare it with the mailed one, replay a
//! dead-lettered file and see it complete, and check that hostile values stay text.
//! Screenshots of each page go to `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use fantoccini::{Client, ClientBuilder, Locator};
use mui_shared::deadletters;
use mui_shared::files::{FileState, NotifyStatus};
use mui_tests::{spawn_app_with, AppOptions};
use tokio_util::sync::CancellationToken;

use super::{config, HOSTILE_CELL, HOSTILE_NAME, TOKEN};

/// Rows of the file whose import the test watches: enough for several seconds of import
/// on a shared 2-core machine (measured: see docs/console.md), with one failed row in 1,000.
const ROWS: usize = 60_000;

/// A real database error for one user while the test wants it (as in dead_letters.rs).
const POISON: &str = "
CREATE TABLE poison (unique_id TEXT PRIMARY KEY);
CREATE FUNCTION poison_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM poison WHERE unique_id = NEW.unique_id) THEN
    RAISE EXCEPTION 'injected failure for unique_id %', NEW.unique_id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION poison_check();
";

/// chromedriver on a free loopback port, killed when dropped.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        let driver = Self { child, port };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return driver;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not listen on port {port} within 10 s");
    }

    async fn browser(&self, downloads: &std::path::Path) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
                "prefs": {
                    "download.default_directory": downloads.to_str().unwrap(),
                    "download.prompt_for_download": false,
                },
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a headless Chromium session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shoot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
}

async fn text_of(b: &Client, css: &str) -> Option<String> {
    let v = b
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![serde_json::json!(css)],
        )
        .await
        .unwrap();
    v.as_str().map(str::to_owned)
}

fn big_file() -> Vec<u8> {
    let mut csv = String::from("unique_id,login_source,first_name,email\n");
    for i in 0..ROWS {
        if i % 1000 == 7 {
            let first = if i == 7 {
                HOSTILE_CELL.to_owned()
            } else {
                format!("Bad {i}")
            };
            csv.push_str(&format!("b{i:06},bogus,{first},b{i}@acme.example.org\n"));
        } else {
            csv.push_str(&format!("u{i:06},sso,Name {i},u{i}@acme.example.org\n"));
        }
    }
    csv.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_watches_an_import_gets_its_report_and_replays_a_dead_letter_in_a_browser() {
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 1000,
        ..Default::default()
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let beta = app.env.tenant("beta").unwrap();
    let mut conn = app.env.db.conn();
    conn.batch_execute(POISON).unwrap();
    diesel::sql_query("INSERT INTO poison VALUES ('p005')")
        .execute(&mut conn)
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let console = tokio::spawn(mui_console::serve(
        listener,
        config(&app.env.db.url),
        stop.clone(),
    ));

    let driver = Chromedriver::start().await;
    let downloads = tempfile::tempdir().unwrap();
    let b = driver.browser(downloads.path()).await;

    // Logging in.
    b.goto(&format!("{base}/")).await.unwrap();
    assert!(text_of(&b, "main form").await.is_some(), "the login form");
    b.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    b.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait()
        .for_element(Locator::Css("#live"))
        .await
        .expect("the overview after logging in");
    shoot(&b, "login-then-overview-empty").await;
    b.execute("window.__marker = 'not reloaded'; return 1;", vec![])
        .await
        .unwrap();

    // A poisoned file of beta's (dies in the queue meanwhile) and acme's large import.
    app.env
        .drop_file(
            "beta",
            "beta.csv",
            b"unique_id,login_source\np001,sso\np002,sso\np005,sso\n",
        )
        .unwrap();
    app.env
        .drop_file("acme", HOSTILE_NAME, &big_file())
        .unwrap();
    let env = &app.env;
    env.wait_until(60, "acme's file registered", || {
        !env.files(&acme).is_empty()
    })
    .await;
    let file = env.files(&acme)[0].id;

    // Its progress changes on the overview without a reload (server-sent events).
    let row = format!("#file-{file} .rows-done");
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while tokio::time::Instant::now() < deadline {
        let status = text_of(&b, &format!("#file-{file} .status")).await;
        let in_progress = status
            .as_deref()
            .is_some_and(|s| s.starts_with("importing") || s.starts_with("received"));
        if let (true, Some(done)) = (in_progress, text_of(&b, &row).await) {
            if !done.starts_with("0 /") && seen.last() != Some(&done) {
                seen.push(done);
                if seen.len() == 2 {
                    shoot(&b, "overview").await;
                }
            }
        }
        if !in_progress && !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        seen.len() >= 2,
        "progress seen changing on the overview: {seen:?}"
    );
    let marker = b.execute("return window.__marker;", vec![]).await.unwrap();
    assert_eq!(
        marker,
        serde_json::json!("not reloaded"),
        "the page was never reloaded"
    );

    let files = app.wait_files_finished(&acme, 1).await;
    assert_eq!(files[0].state, FileState::Done);
    assert_eq!(files[0].rows_failed, (ROWS / 1000) as i64);
    assert_eq!(files[0].notify_status, NotifyStatus::Sent);

    // The file's page; hostile values are shown as text and run nothing.
    b.goto(&format!("{base}/files/{file}")).await.unwrap();
    assert_eq!(
        text_of(&b, "#file-name").await.as_deref(),
        Some(HOSTILE_NAME)
    );
    assert_eq!(text_of(&b, "#notify-status").await.as_deref(), Some("sent"));
    let body = text_of(&b, "table.failures").await.unwrap();
    assert!(
        body.contains(HOSTILE_CELL),
        "the hostile cell shown as text"
    );
    let xss = b
        .execute("return [window.__xss === undefined, document.querySelectorAll('img, main script').length];", vec![])
        .await
        .unwrap();
    assert_eq!(
        xss,
        serde_json::json!([true, 0]),
        "no injected element, nothing ran"
    );
    shoot(&b, "file").await;

    // The failures CSV through the page's download link is the mailed attachment.
    let bytes = b
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(document.querySelector('#download-csv').href)
               .then(r => r.arrayBuffer())
               .then(buf => done(Array.from(new Uint8Array(buf))))
               .catch(e => done(String(e)));",
            vec![],
        )
        .await
        .unwrap();
    let downloaded: Vec<u8> = serde_json::from_value(bytes).expect("the CSV's bytes");
    let mails = app.env.smtp.messages_to("it@acme.example.org");
    assert_eq!(mails.len(), 1);
    let (name, mailed) = mails[0]
        .attachments()
        .into_iter()
        .find(|(n, _)| n.ends_with(".failures.csv"))
        .expect("the failures CSV attached");
    assert_eq!(name, format!("{HOSTILE_NAME}.failures.csv"));
    assert_eq!(downloaded, mailed, "downloaded CSV = mailed CSV");
    assert_eq!(mui_tests::parse_csv(&downloaded).len(), 1 + ROWS / 1000);
    // And as a download, by a click on the link.
    b.find(Locator::Css("#download-csv"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut saved = None;
    for _ in 0..100 {
        let done: Vec<PathBuf> = std::fs::read_dir(downloads.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            // Chromium writes a download first as `<name>.crdownload` or as a hidden
            // `.org.chromium.Chromium.XXXXXX`, then renames it: only the final name counts.
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| !n.ends_with(".crdownload") && !n.starts_with('.'))
            })
            .collect();
        if let [one] = done.as_slice() {
            saved = Some(one.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let saved = saved.expect("the failures CSV downloaded within 10 s");
    let name = saved.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with(".failures.csv"), "{name}");
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        mailed,
        "downloaded file = mailed CSV"
    );

    // The pages an operator walks through.
    b.goto(&format!("{base}/tenants")).await.unwrap();
    shoot(&b, "tenants").await;
    b.goto(&format!("{base}/tenants/acme")).await.unwrap();
    shoot(&b, "tenant").await;
    b.goto(&format!("{base}/held")).await.unwrap();
    shoot(&b, "held").await;

    // beta's dead letter: replayed after the fix, from the page; the file completes.
    let env = &app.env;
    env.wait_until(180, "beta's chunk dead-lettered", || {
        deadletters::list(&mut env.db.conn(), Some(beta.id), false)
            .unwrap()
            .len()
            == 1
    })
    .await;
    let dead = deadletters::list(&mut conn, Some(beta.id), false).unwrap()[0].clone();
    diesel::sql_query("DELETE FROM poison")
        .execute(&mut conn)
        .unwrap();
    b.goto(&format!("{base}/dead-letters")).await.unwrap();
    shoot(&b, "dead-letters").await;
    b.find(Locator::XPath(&format!(
        "//tr[@id='dead-letter-{}']//button[text()='Replay file']",
        dead.id
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let result = b
        .wait()
        .for_element(Locator::Css("#replay-result"))
        .await
        .unwrap();
    let said = result.text().await.unwrap();
    assert!(said.contains("1 dead letter(s) replayed"), "{said}");
    shoot(&b, "replayed").await;
    let beta_file = dead.file_id.unwrap();
    let mut state = None;
    for _ in 0..240 {
        b.goto(&format!("{base}/files/{beta_file}")).await.unwrap();
        state = text_of(&b, "#file-state").await;
        let mail = text_of(&b, "#notify-status").await;
        if state.as_deref() == Some("done") && mail.as_deref() == Some("not_needed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        state.as_deref(),
        Some("done"),
        "the replayed file completes"
    );
    shoot(&b, "file-after-replay").await;
    assert_eq!(app.env.users(&beta).len(), 3);

    b.close().await.unwrap();
    drop(driver);
    stop.cancel();
    console.await.unwrap().unwrap();
    app.stop().await;
}
