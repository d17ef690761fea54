//! The reader's unit tests: encodings, row numbers, limits, quotes and bounds.

use super::*;
use std::io::Cursor;

fn read(bytes: &[u8]) -> (Sniff, Result<ReadSummary, FileProblem>, Vec<RawRow>) {
    let mut cur = Cursor::new(bytes.to_vec());
    let s = sniff(&mut cur, None).unwrap();
    let mut all = Vec::new();
    let r = read_chunks(
        cur,
        &s,
        Limits::default(),
        Chunking::rows(2),
        |_, _, _| {},
        |_, _, _, rows| {
            all.extend(rows);
            Ok(())
        },
    )
    .unwrap();
    (s, r, all)
}

#[test]
fn utf8_with_bom_and_crlf() {
    let (s, r, rows) = read(
        b"\xEF\xBB\xBFunique_id,login_source,first_name\r\n1,sso,Ren\xC3\xA9e\r\n2,sso,Bob\r\n",
    );
    assert_eq!(s.encoding_label(), "UTF-8 with BOM");
    let r = r.unwrap();
    assert_eq!(r.header[0], "unique_id");
    assert_eq!(rows.len(), 2);
    assert_eq!(&rows[0].fields[2], "Renée");
    assert_eq!(rows[0].row, 2);
}

#[test]
fn windows_1252_is_detected() {
    let (s, r, rows) = read(b"unique_id,login_source,first_name\r\n1,sso,Ren\xE9e Mu\xF1oz\r\n");
    assert_eq!(s.encoding.name(), "windows-1252");
    assert!(r.is_ok());
    assert_eq!(&rows[0].fields[2], "Renée Muñoz");
}

#[test]
fn quoted_newlines_and_blank_lines_keep_spreadsheet_row_numbers() {
    for data in [
        &b"unique_id,login_source,street\n1,sso,\"a\nb, c\"\n\n3,sso,x\n\n7,sso,y"[..],
        &b"unique_id,login_source,street\r\n1,sso,\"a\r\nb, c\"\r\n\r\n3,sso,x\r\n\r\n7,sso,y\r\n"
            [..],
        &b"unique_id,login_source,street\r1,sso,\"a\rb, c\"\r\r3,sso,x\r\r7,sso,y\r"[..],
    ] {
        let (_, r, rows) = read(data);
        let r = r.unwrap();
        assert_eq!(r.rows, 3);
        assert_eq!(rows[0].row, 2);
        assert_eq!(&rows[0].fields[2], "a\nb, c");
        assert_eq!(rows[1].row, 4, "{rows:?}");
        assert_eq!(rows[2].row, 6, "{rows:?}");
    }
}

#[test]
fn chunks_are_bounded() {
    let (_, r, rows) = read(b"unique_id,login_source\n1,a\n2,a\n3,a\n4,a\n5,a\n");
    let r = r.unwrap();
    assert_eq!(r.chunks, 3);
    assert_eq!(rows.len(), 5);
}

#[test]
fn broken_utf8_is_reported_where_it_is() {
    let (s, r, _) =
        read(b"unique_id,login_source,first_name\n1,sso,Ren\xC3\xA9e\n2,sso,Bj\xF8rn\n");
    assert_eq!(s.encoding.name(), "UTF-8");
    let p = r.unwrap_err();
    assert_eq!(p.code, FileErrorCode::BadEncoding);
    assert!(
        p.message.contains("line 3 (at byte offset 55)"),
        "{}",
        p.message
    );
}

#[test]
fn utf16_with_bom() {
    let text = "unique_id,login_source,first_name\r\n1,sso,Zoë\r\n";
    let mut bytes = vec![0xFF, 0xFE];
    for unit in text.encode_utf16() {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    let (s, r, rows) = read(&bytes);
    assert_eq!(s.encoding_label(), "UTF-16LE with BOM");
    assert_eq!(r.unwrap().rows, 1);
    assert_eq!(&rows[0].fields[2], "Zoë");
}

#[test]
fn limits_refuse_before_reading_rows() {
    let mut cur = Cursor::new(b"unique_id,login_source\n1,a\n\"2\nstill 2\",a\n3,a\n".to_vec());
    let s = sniff(&mut cur, None).unwrap();
    assert_eq!(s.rows_at_most, Some(3));
    let limits = Limits {
        max_bytes: 1 << 20,
        max_rows: 2,
    };
    assert_eq!(s.problem(&limits).unwrap().code, FileErrorCode::TooLarge);
    let limits = Limits {
        max_bytes: 10,
        max_rows: 100,
    };
    assert!(s
        .problem(&limits)
        .unwrap()
        .message
        .contains("at most 10 bytes"));
    assert!(s.problem(&Limits::default()).is_none());
}

#[test]
fn semicolons_and_tabs() {
    assert_eq!(detect_delimiter(b"unique_id;login_source;email\n"), b';');
    assert_eq!(detect_delimiter(b"unique_id\tlogin_source\n"), b'\t');
    assert_eq!(detect_delimiter(b"unique_id,login_source;x\n"), b',');
    let (_, r, rows) = read(b"unique_id;login_source\n1;sso\n");
    assert_eq!(r.unwrap().delimiter, b';');
    assert_eq!(rows[0].fields, vec!["1", "sso"]);
}

#[test]
fn file_level_problems() {
    let (_, r, _) = read(b"");
    assert_eq!(r.unwrap_err().code, FileErrorCode::EmptyFile);
    let (_, r, _) = read(b"\n\n");
    assert_eq!(r.unwrap_err().code, FileErrorCode::EmptyFile);
    let (_, r, _) = read(b"unique_id,login_source\n");
    assert_eq!(r.unwrap_err().code, FileErrorCode::HeaderOnly);
    let (_, r, _) = read(b"unique_id,email\n1,a@b.c\n");
    let p = r.unwrap_err();
    assert_eq!(p.code, FileErrorCode::MissingRequiredColumn);
    assert!(p.message.contains("login_source"), "{}", p.message);
    let (_, r, _) = read(b"PK\x03\x04\x14\x00\x06\x00rest-of-zip");
    let p = r.unwrap_err();
    assert_eq!(p.code, FileErrorCode::NotCsv);
    assert!(p.message.contains("xlsx"), "{}", p.message);
}

#[test]
fn a_huge_line_is_a_file_problem_not_a_crash() {
    let mut data = b"unique_id,login_source\n1,".to_vec();
    data.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
    let (_, r, _) = read(&data);
    let p = r.unwrap_err();
    assert_eq!(p.code, FileErrorCode::LineTooLong);
    assert!(p.message.starts_with("line 2 is longer"), "{}", p.message);
}

#[test]
fn an_unclosed_quote_names_its_row_and_line() {
    let mut data =
        b"unique_id,login_source,street\n1,sso,\"a\nb\"\n2,sso,x\n3,sso,\"never closed\n".to_vec();
    for i in 0..1000 {
        data.extend_from_slice(format!("{i},sso,y\n").as_bytes());
    }
    let (_, r, _) = read(&data);
    let p = r.unwrap_err();
    assert_eq!(p.code, FileErrorCode::UnclosedQuote);
    assert!(p.message.contains("row 4, on line 5"), "{}", p.message);
    // A quote closed on the last line is fine.
    let (_, r, rows) = read(b"unique_id,login_source,street\n1,sso,\"a\nb\"");
    assert!(r.is_ok());
    assert_eq!(&rows[0].fields[2], "a\nb");
}

#[test]
fn a_huge_record_is_a_row_failure_not_the_file() {
    let mut data = b"unique_id,login_source,street\n1,sso,\"".to_vec();
    for _ in 0..30_000 {
        data.extend_from_slice(b"0123456789012345678901234567890123456789\n");
    }
    data.extend_from_slice(b"\"\n2,sso,x\n");
    let (_, r, rows) = read(&data);
    let r = r.unwrap();
    assert_eq!(r.rows, 2);
    let big = rows[0].too_large.as_ref().unwrap();
    assert!(big.bytes > MAX_RECORD_BYTES as u64);
    assert!(rows[0].fields.is_empty());
    assert_eq!(big.start[0], "1");
    assert_eq!(rows[1].row, 3);
    assert_eq!(&rows[1].fields[2], "x");
}

#[test]
fn chunks_are_bounded_in_bytes() {
    let mut data = b"unique_id,login_source,street\n".to_vec();
    for i in 0..100 {
        data.extend_from_slice(format!("{i},sso,{}\n", "s".repeat(1000)).as_bytes());
    }
    let mut cur = Cursor::new(data);
    let s = sniff(&mut cur, None).unwrap();
    let mut sizes = Vec::new();
    let r = read_chunks(
        cur,
        &s,
        Limits::default(),
        Chunking {
            rows: 1000,
            max_bytes: 10_000,
        },
        |_, _, _| {},
        |_, _, _, rows| {
            sizes.push(rows.len());
            Ok(())
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.rows, 100);
    assert!(sizes.len() >= 10, "{sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 10), "{sizes:?}");
}

#[test]
fn a_tenants_own_header_names_are_read_as_ours_and_handed_on_as_uploaded() {
    use mui_shared::domain::Column;
    let aliases = vec![
        ("employee_id".to_owned(), Column::UniqueId),
        ("sso".to_owned(), Column::LoginSource),
    ];
    let cells: Vec<String> = ["Employee ID", " SSO ", "First Name", "Badge"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        super::apply_aliases(&cells, &aliases),
        ["unique_id", "login_source", "First Name", "Badge"]
    );
    let data = b"Employee ID,SSO,First Name\nE1,sso,Ann\n";
    let sniff = super::sniff(&mut std::io::Cursor::new(&data[..]), None).unwrap();
    let mut uploaded = Vec::new();
    let mut chunk_header = Vec::new();
    let r = super::read_chunks_mapped(
        &data[..],
        &sniff,
        super::Limits::default(),
        super::Chunking::rows(10),
        &aliases,
        |cells, _, _| uploaded = cells.to_vec(),
        |_, header, _, _| {
            chunk_header = header.to_vec();
            Ok(())
        },
    )
    .unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(uploaded, ["Employee ID", "SSO", "First Name"]);
    assert_eq!(chunk_header, ["unique_id", "login_source", "First Name"]);
    // Without the names, the file lacks our required columns.
    let plain = super::read_chunks(
        &data[..],
        &sniff,
        super::Limits::default(),
        super::Chunking::rows(10),
        |_, _, _| {},
        |_, _, _, _| Ok(()),
    )
    .unwrap();
    assert!(plain.is_err());
}

/// The encoding a file of `text`, saved in `enc`, is read as for a tenant of `region`, and the
/// detector's guess without the region when it differs.
fn read_as(
    text: &str,
    enc: &'static encoding_rs::Encoding,
    region: Option<&str>,
) -> (&'static str, Option<&'static str>) {
    let (bytes, _, unmappable) = enc.encode(text);
    assert!(!unmappable, "{text:?} is all {}", enc.name());
    let s = sniff(&mut Cursor::new(bytes.to_vec()), region).unwrap();
    (s.encoding.name(), s.unhinted_guess.map(|e| e.name()))
}

#[test]
fn a_one_line_excel_file_of_western_names_is_windows_1252_without_a_region() {
    // chardetng alone reads these bytes as Windows-1250 ("Ţór"): a one-row file is too
    // little text for it to tell.
    let text =
        "unique_id,login_source,first_name,last_name,street,city\nu0,sso,Zürich,O'Brien,Þór,José\n";
    assert_eq!(
        read_as(text, encoding_rs::WINDOWS_1252, None),
        ("windows-1252", Some("windows-1250"))
    );
    // For a Romanian tenant the same bytes are Windows-1250's "Ţór", and not a close call
    // (the region decides).
    assert_eq!(
        read_as(text, encoding_rs::WINDOWS_1252, Some("ro")),
        ("windows-1250", None)
    );
}

#[test]
fn a_central_european_file_is_read_in_its_regions_excel_encoding() {
    let czech = "unique_id,login_source,first_name,last_name\nu1,sso,Antonín,Dvořák\nu2,sso,Božena,Němcová\n";
    assert_eq!(
        read_as(czech, encoding_rs::WINDOWS_1250, Some("cz")),
        ("windows-1250", None)
    );
    // Polish Excel writes Windows-1250, not the ISO-8859-2 of Polish web pages.
    let polish = "unique_id,login_source,first_name,last_name\nu1,sso,Łukasz,Wąsowski\nu2,sso,Żaneta,Świątek\n";
    assert_eq!(
        read_as(polish, encoding_rs::WINDOWS_1250, Some("pl")).0,
        "windows-1250"
    );
    let turkish = "unique_id,login_source,first_name,last_name\nu1,sso,Ayşe,Yılmaz\n";
    assert_eq!(
        read_as(turkish, encoding_rs::WINDOWS_1254, Some("tr")).0,
        "windows-1254"
    );
    // Without its region a Czech file is read as Windows-1252, and the detector's other
    // reading is kept for the file's notice.
    assert_eq!(
        read_as(czech, encoding_rs::WINDOWS_1250, None),
        ("windows-1252", Some("windows-1250"))
    );
}

#[test]
fn other_scripts_are_found_without_a_region() {
    let russian = "unique_id,login_source,first_name,last_name\nu1,sso,Иван,Петров\n";
    assert_eq!(
        read_as(russian, encoding_rs::WINDOWS_1251, None).0,
        "windows-1251"
    );
    let greek = "unique_id,login_source,first_name,last_name\nu1,sso,Γιώργος,Παπαδόπουλος\n";
    assert_eq!(
        read_as(greek, encoding_rs::WINDOWS_1253, None).0,
        "windows-1253"
    );
}

#[test]
fn a_region_that_is_not_a_country_code_is_no_region() {
    let text = "unique_id,login_source,first_name\nu0,sso,Þór\n";
    for bad in ["", "CZ", "c.", "czech", "ñ1"] {
        assert_eq!(
            read_as(text, encoding_rs::WINDOWS_1252, Some(bad)).0,
            "windows-1252",
            "{bad:?}"
        );
    }
}

/// The check pass reads with [`read_chunks_keeping`]: it must decide exactly what the full
/// read decides (summary or problem, rows and their numbers), with the kept cells as they
/// are and every other cell empty.
#[test]
fn keeping_a_few_columns_decides_what_the_full_read_decides() {
    let long_cell = "x".repeat(MAX_RECORD_BYTES + 10);
    let too_large =
        format!("unique_id,login_source,active\n1,sso,1\n2,sso,\"{long_cell}\"\n3,sso,0\n");
    let inputs: Vec<Vec<u8>> = vec![
        b"unique_id,login_source,first_name,active\n1,sso,Ann,1\n2,sso,Bob,0\n".to_vec(),
        b"unique_id,login_source,street,active\r\n1,sso,\"a\r\nb, c\"\r\n\r\n  ,  , \r\n3,sso,x,0\r\n"
            .to_vec(),
        b"unique_id,login_source,street\r1,sso,\"a\rb\"\r\r3,sso,y\r".to_vec(),
        b"first_name;unique_id;login_source;active\nAnn;u1;sso;\nBob;u2;sso;0\n".to_vec(),
        b"unique_id,login_source,street\n1,sso,\"never closed\n2,sso,x\n".to_vec(),
        b"unique_id,login_source\n".to_vec(),
        b"unique_id,first_name\n1,Ann\n".to_vec(),
        b"unique_id,login_source,extra\n1,sso,a,b,c\n2\n".to_vec(),
        too_large.into_bytes(),
    ];
    let keep = [Column::UniqueId, Column::Active];
    for input in inputs {
        let mut cur = Cursor::new(input.clone());
        let s = sniff(&mut cur, None).unwrap();
        let mut full = Vec::new();
        let full_result = read_chunks(
            Cursor::new(input.clone()),
            &s,
            Limits::default(),
            Chunking::rows(2),
            |_, _, _| {},
            |_, _, _, rows| {
                full.extend(rows);
                Ok(())
            },
        )
        .unwrap();
        let mut kept = Vec::new();
        let mut map_seen = None;
        let kept_result = read_chunks_keeping(
            Cursor::new(input.clone()),
            &s,
            Limits::default(),
            Chunking::rows(2),
            &[],
            Some(&keep),
            |_, map, _| map_seen = Some(map.clone()),
            |_, _, _, rows| {
                kept.extend(rows);
                Ok(())
            },
        )
        .unwrap();
        let text = String::from_utf8_lossy(&input[..input.len().min(80)]).into_owned();
        match (&full_result, &kept_result) {
            (Ok(a), Ok(b)) => {
                assert_eq!(
                    (a.rows, &a.header, a.delimiter),
                    (b.rows, &b.header, b.delimiter),
                    "{text}"
                )
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
            _ => panic!("{text}: {full_result:?} vs {kept_result:?}"),
        }
        assert_eq!(full.len(), kept.len(), "{text}");
        let Some(map) = map_seen else { continue };
        for (a, b) in full.iter().zip(&kept) {
            assert_eq!(a.row, b.row, "{text}");
            assert_eq!(a.too_large, b.too_large, "{text}");
            if a.too_large.is_some() {
                continue;
            }
            assert_eq!(a.fields.len(), b.fields.len(), "{text}");
            for (i, (x, y)) in a.fields.iter().zip(b.fields.iter()).enumerate() {
                let wanted = map
                    .positions
                    .get(i)
                    .copied()
                    .flatten()
                    .is_some_and(|c| keep.contains(&c));
                assert_eq!(y, if wanted { x } else { "" }, "{text}: cell {i}");
            }
        }
    }
}
