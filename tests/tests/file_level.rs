//! Files that cannot be imported at all: one clear email each, nothing imported.

use mui_shared::files::{FileState, NotifyStatus};
use mui_tests::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_unimportable_file_gets_one_clear_email_and_imports_nothing() {
    let mut app = spawn_app().await;
    let env = &app.env;
    let t = env.tenant("acme").unwrap();
    let cases: [(&str, &[u8], &str, &str); 5] = [
        (
            "nocol.csv",
            b"unique_id,email\n1,a@example.org\n",
            "missing_required_column",
            "the header has no `login_source` column",
        ),
        ("empty.csv", b"", "empty_file", "the file is empty"),
        (
            "headeronly.csv",
            b"unique_id,login_source\r\n",
            "header_only",
            "a header row but no users",
        ),
        (
            "sheet.csv",
            b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00binary-zip-content",
            "not_csv",
            "Excel .xlsx",
        ),
        (
            "users.xlsx",
            b"unique_id,login_source\n1,sso\n",
            "not_csv_name",
            "only .csv files are imported",
        ),
    ];
    for (name, content, _, _) in &cases {
        env.drop_file("acme", name, content).unwrap();
    }
    let files = app.wait_files_settled(&t, cases.len()).await;
    assert_eq!(files.len(), cases.len());
    assert!(env.users(&t).is_empty(), "nothing imported");
    let mails = env.smtp.messages();
    assert_eq!(mails.len(), cases.len(), "one email per file");
    for (name, _, code, says) in &cases {
        let f = files.iter().find(|f| f.file_name == *name).unwrap();
        assert_eq!(f.state, FileState::Failed, "{name}");
        assert_eq!(f.error_code.as_deref(), Some(*code), "{name}");
        assert_eq!(f.notify_status, NotifyStatus::Sent, "{name}");
        assert!(
            env.folder("acme").join("bak").join(name).exists(),
            "{name} archived"
        );
        let mail = mails
            .iter()
            .find(|m| {
                m.subject()
                    .starts_with(&format!("User import \"{name}\" failed:"))
            })
            .unwrap_or_else(|| panic!("no email for {name}"));
        assert!(
            mail.subject().contains(says) || mail.body().contains(says),
            "{name}: {}\n{}",
            mail.subject(),
            mail.body()
        );
        assert!(mail.body().contains("was NOT imported"), "{name}");
        assert!(
            mail.attachments().is_empty(),
            "{name}: no failures CSV for a file-level failure"
        );
    }
    app.stop().await;
}
