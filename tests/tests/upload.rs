//! Uploads still in progress are not taken.

use std::time::Duration;

use mui_tests::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_written_in_pieces_is_not_taken_until_it_is_complete() {
    let mut app = spawn_app().await;
    let t = app.env.tenant("acme").unwrap();
    let path = app.env.folder("acme").join("slow.csv");
    // Written by the writer once its last piece is in, before it closes the file: until
    // then, nothing may be taken. (Whether the child has exited says less: its exit closes
    // the file before the test can reap it, and a file whole and closed may be taken.)
    let marks = tempfile::tempdir().unwrap();
    let written = marks.path().join("written");
    // Another process writes the file in 20 pieces, one every 150 ms (less than the 400 ms
    // settle interval), holding it open throughout as sftp-server does.
    let script = format!(
        "exec 3>'{}'; printf 'unique_id,login_source,first_name\\n' >&3; \
         for i in $(seq 0 19); do sleep 0.15; printf 's%s,sso,Slow %s\\n' $i $i >&3; done; \
         : > '{}'",
        path.display(),
        written.display()
    );
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .unwrap();
    // Looked at in this order: a file registered before a look at the mark that finds none
    // was taken before the last piece was in.
    for look in 0.. {
        let taken = !app.env.files(&t).is_empty();
        let finished = written.exists();
        assert!(
            !taken || finished,
            "taken while still being written (look {look})"
        );
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.wait().await.unwrap().success());
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(
        files[0].rows_total,
        Some(20),
        "every row of the finished file"
    );
    assert_eq!(app.env.users(&t).len(), 20);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_that_pauses_longer_than_the_settle_interval_is_waited_for() {
    let mut app = spawn_app().await;
    let t = app.env.tenant("acme").unwrap();
    let path = app.env.folder("acme").join("paused.csv");
    // Another process holds the file open for writing, as sftp-server does, and pauses for
    // 2 s (five settle intervals) in the middle of the upload.
    let script = format!(
        "exec 3>'{}'; printf 'unique_id,login_source\\np1,sso\\n' >&3; sleep 2; printf 'p2,sso\\np3,sso\\n' >&3",
        path.display()
    );
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        app.env.files(&t).is_empty(),
        "taken while the writer still held it open"
    );
    assert!(child.wait().await.unwrap().success());
    let files = app.wait_files_settled(&t, 1).await;
    assert_eq!(files[0].rows_total, Some(3));
    assert_eq!(app.env.users(&t).len(), 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drop_folder_deleted_and_made_again_is_still_watched() {
    // No rescan during the test: only file-system events can find the files.
    let mut app = mui_tests::spawn_app_with(mui_tests::AppOptions {
        rescan_secs: 3600,
        ..mui_tests::AppOptions::default()
    })
    .await;
    let t = app.env.tenant("acme").unwrap();
    app.env
        .drop_file("acme", "first.csv", b"unique_id,login_source\nf1,sso\n")
        .unwrap();
    app.wait_files_settled(&t, 1).await;
    let folder = app.env.folder("acme");
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    // Let the rescan that the folder's creation triggers pass first, so that only a watch on
    // the new folder can see the file arrive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.env
        .drop_file("acme", "second.csv", b"unique_id,login_source\nf2,sso\n")
        .unwrap();
    let files = app.wait_files_settled(&t, 2).await;
    assert_eq!(files[1].file_name, "second.csv");
    assert_eq!(app.env.users(&t).len(), 2);
    assert!(folder.join("bak/second.csv").exists());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_whose_events_overflowed_the_kernel_queue_are_still_found() {
    // ingest's inotify instance gets a queue of 16 events (the limit is read when the
    // instance is made; restored at once), and there is no periodic rescan during the test:
    // only the overflow notice can make ingest look again.
    struct Limit(String);
    const LIMIT: &str = "/proc/sys/fs/inotify/max_queued_events";
    impl Drop for Limit {
        fn drop(&mut self) {
            let _ = std::fs::write(LIMIT, self.0.trim());
        }
    }
    let limit = Limit(std::fs::read_to_string(LIMIT).unwrap());
    std::fs::write(LIMIT, "16").unwrap();
    let mut app = mui_tests::spawn_app_with(mui_tests::AppOptions {
        rescan_secs: 3600,
        ..mui_tests::AppOptions::default()
    })
    .await;
    let t = app.env.tenant("acme").unwrap();
    // The tenant's folder watch is made by the rescan its creation triggers.
    app.env
        .drop_file("acme", "first.csv", b"unique_id,login_source\nf0,sso\n")
        .unwrap();
    app.wait_files_settled(&t, 1).await;
    // ingest's watcher exists by now. (Services of tests that started meanwhile got the short
    // queue too; they overflow and rescan, which is what this test is about.)
    drop(limit);
    // 40 files at once: 80 events or more (create, write, close, rename) for a queue of 16.
    for i in 1..=40 {
        app.env
            .drop_file(
                "acme",
                &format!("f{i}.csv"),
                format!("unique_id,login_source\nf{i},sso\n").as_bytes(),
            )
            .unwrap();
    }
    let files = app.wait_files_settled(&t, 41).await;
    assert_eq!(files.len(), 41);
    assert_eq!(app.env.users(&t).len(), 41);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_closed_by_its_writer_or_renamed_into_place_does_not_wait_out_the_settle_interval() {
    // A settle interval far longer than the test may take: only the close and the rename
    // seen by inotify can make these files ready in time (a file a rescan finds waits the
    // settle interval).
    let mut app = mui_tests::spawn_app_with(mui_tests::AppOptions {
        settle_ms: 3_600_000,
        ..mui_tests::AppOptions::default()
    })
    .await;
    let acme = app.env.tenant("acme").unwrap();
    let globex = app.env.tenant("globex").unwrap();
    // Let the rescans that the folders' creation triggers install their watches first.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Written and closed in place.
    std::fs::write(
        app.env.folder("acme").join("closed.csv"),
        "unique_id,login_source\nc1,sso\nc2,sso\n",
    )
    .unwrap();
    // Uploaded under a temporary name, then renamed into place.
    let part = app.env.folder("globex").join("renamed.csv.filepart");
    std::fs::write(&part, "unique_id,login_source\nr1,sso\n").unwrap();
    std::fs::rename(&part, app.env.folder("globex").join("renamed.csv")).unwrap();
    let a = app.wait_files_settled(&acme, 1).await;
    let g = app.wait_files_settled(&globex, 1).await;
    assert_eq!((a[0].rows_total, g[0].rows_total), (Some(2), Some(1)));
    assert_eq!(app.env.users(&acme).len(), 2);
    assert_eq!(app.env.users(&globex).len(), 1);
    app.stop().await;
}
