//! Faults: the pipeline completes on its own when things break under it.

use mui_tests::{parse_csv, spawn_app_with, AppOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_completes_when_every_broker_connection_is_cut_twice_midway() {
    let mut app = spawn_app_with(AppOptions {
        chunk_rows: 2,
        broker_proxy: true,
        ..Default::default()
    })
    .await;
    let t = app.env.tenant("acme").unwrap();
    let mut csv = String::from("unique_id,login_source,first_name\n");
    for i in 0..300 {
        let source = if i % 50 == 13 { "bogus" } else { "sso" };
        csv.push_str(&format!("id{i:03},{source},Name {i}\n"));
    }
    app.env
        .drop_file("acme", "big.csv", csv.as_bytes())
        .unwrap();
    let proxy = app.env.broker.clone().unwrap();
    {
        let env = &app.env;
        env.wait_until(60, "first users", || env.users(&t).len() >= 20)
            .await;
        proxy.cut();
        env.wait_until(90, "more users after the first cut", || {
            env.users(&t).len() >= 150
        })
        .await;
        proxy.cut();
    }
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files.len(), 1, "one file, registered once");
    assert_eq!(
        (
            files[0].rows_total,
            files[0].rows_inserted,
            files[0].rows_failed
        ),
        (Some(300), 294, 6),
        "rows, inserted, failed"
    );
    assert_eq!(app.env.users(&t).len(), 294);
    let mails = app.env.smtp.messages();
    assert_eq!(mails.len(), 1, "exactly one email");
    let rows = parse_csv(&mails[0].attachments()[0].1);
    assert_eq!(rows.len(), 7, "each bad row reported once");
    app.stop().await;
}
