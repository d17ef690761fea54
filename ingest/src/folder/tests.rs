//! The folder handle against links, FIFOs, escapes, re-uploads and long names.

use super::*;
use std::os::unix::fs::symlink;

fn setup() -> (tempfile::TempDir, TenantFolder) {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("acme/upload")).unwrap();
    std::fs::create_dir_all(root.path().join("globex/upload")).unwrap();
    let f = TenantFolder::open(root.path(), "globex").unwrap();
    (root, f)
}

#[test]
fn never_overwrites_and_is_retry_safe() {
    let (root, f) = setup();
    let d = root.path().join("globex/upload");
    std::fs::write(d.join("users.csv"), "one").unwrap();
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    let (n, notice) = f
        .archive(OsStr::new("users.csv"), &file, "users.csv", 1)
        .unwrap();
    assert_eq!((n.as_str(), notice), ("users.csv", None));
    std::fs::write(d.join("users.csv"), "two").unwrap();
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    assert_eq!(
        f.archive(OsStr::new("users.csv"), &file, "users.csv", 2)
            .unwrap()
            .0,
        "users.2.csv"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("bak/users.csv")).unwrap(),
        "one"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("bak/users.2.csv")).unwrap(),
        "two"
    );
    assert!(!d.join("users.csv").exists());
    // Interrupted after an older version's link: the retry recognises its own link.
    std::fs::write(d.join("users.csv"), "three").unwrap();
    std::fs::hard_link(d.join("users.csv"), d.join("bak/users.3.csv")).unwrap();
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    assert_eq!(
        f.archive(OsStr::new("users.csv"), &file, "users.csv", 3)
            .unwrap()
            .0,
        "users.3.csv"
    );
    assert!(!d.join("users.csv").exists());
    assert_eq!(std::fs::read_dir(d.join("bak")).unwrap().count(), 3);
}

#[test]
fn a_reupload_under_the_same_name_is_left_in_place_and_the_first_is_copied() {
    let (root, f) = setup();
    let d = root.path().join("globex/upload");
    std::fs::write(d.join("users.csv"), "first").unwrap();
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    // The tenant uploads again: a new file renamed over the name.
    std::fs::write(d.join("users.csv.filepart"), "second").unwrap();
    std::fs::rename(d.join("users.csv.filepart"), d.join("users.csv")).unwrap();
    let (n, _) = f
        .archive(OsStr::new("users.csv"), &file, "users.csv", 7)
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("bak").join(&n)).unwrap(),
        "first"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("users.csv")).unwrap(),
        "second"
    );
    // The second one later goes beside it, never over it.
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    let (n2, _) = f
        .archive(OsStr::new("users.csv"), &file, "users.csv", 8)
        .unwrap();
    assert_ne!(n, n2);
    assert_eq!(
        std::fs::read_to_string(d.join("bak").join(&n2)).unwrap(),
        "second"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("bak").join(&n)).unwrap(),
        "first"
    );
}

#[test]
fn a_bak_link_to_another_tenant_is_never_followed() {
    let (root, f) = setup();
    let d = root.path().join("globex/upload");
    symlink("../../acme/upload", d.join("bak")).unwrap();
    std::fs::write(d.join("users.csv"), "globex rows").unwrap();
    let file = f.open_file(OsStr::new("users.csv")).unwrap();
    let (n, notice) = f
        .archive(OsStr::new("users.csv"), &file, "users.csv", 5)
        .unwrap();
    assert!(notice.unwrap().contains("symbolic link"));
    assert!(d.join("bak").is_dir() && !d.join("bak").is_symlink());
    assert_eq!(
        std::fs::read_to_string(d.join("bak").join(n)).unwrap(),
        "globex rows"
    );
    assert!(std::fs::symlink_metadata(d.join("bak.not-a-folder.5"))
        .unwrap()
        .is_symlink());
    assert_eq!(
        std::fs::read_dir(root.path().join("acme/upload"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn links_fifos_and_escapes_are_refused() {
    let (root, f) = setup();
    let d = root.path().join("globex/upload");
    std::fs::write(root.path().join("acme/upload/secret.csv"), "x").unwrap();
    symlink("../../acme/upload/secret.csv", d.join("link.csv")).unwrap();
    assert!(f.open_file(OsStr::new("link.csv")).is_err());
    assert_eq!(
        f.stat(OsStr::new("link.csv")).unwrap().kind,
        EntryKind::Symlink
    );
    for bad in ["..", ".", "../acme", "a/b", ""] {
        assert!(f.open_file(OsStr::new(bad)).is_err(), "{bad}");
    }
    // The upload folder itself replaced by a link: refused.
    std::fs::remove_dir_all(root.path().join("acme/upload")).unwrap();
    symlink("../globex/upload", root.path().join("acme/upload")).unwrap();
    assert!(matches!(
        TenantFolder::open(root.path(), "acme"),
        Err(FolderError::NotAFolder(_))
    ));
}

#[test]
fn names_that_are_not_utf8_are_escaped() {
    assert_eq!(
        display_name(OsStr::from_bytes(b"caf\xE9 100%.csv")),
        ("caf%E9 100%25.csv".to_owned(), true)
    );
    assert_eq!(
        display_name(OsStr::new("100%.csv")),
        ("100%.csv".to_owned(), false)
    );
}

#[test]
fn long_names_are_archived_under_a_name_that_fits() {
    let (root, f) = setup();
    let d = root.path().join("globex/upload");
    let long = format!("{}.csv", "é".repeat(125)); // 254 bytes
    std::fs::write(d.join(&long), "x").unwrap();
    let file = f.open_file(OsStr::new(&long)).unwrap();
    assert_eq!(
        f.archive(OsStr::new(&long), &file, &long, 1).unwrap().0,
        long
    );
    std::fs::write(d.join(&long), "y").unwrap();
    let file = f.open_file(OsStr::new(&long)).unwrap();
    let (n, _) = f.archive(OsStr::new(&long), &file, &long, 123_456).unwrap();
    assert!(n.len() <= 255 && n.ends_with(".123456.csv"), "{n}");
    assert_eq!(std::fs::read_to_string(d.join("bak").join(n)).unwrap(), "y");
}
