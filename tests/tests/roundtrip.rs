//! Property: any set of valid users, written by a CSV writer in any supported encoding,
//! delimiter and line ending, reads back identically through ingest's reader and the
//! worker's row checks (the code path of every upload).

use std::io::Cursor;

use mui_ingest::reader::{self, Limits};
use mui_worker::validate::{self, TenantRules};
use proptest::prelude::*;

/// Real-world names and addresses, all representable in Windows-1252, with the characters
/// that make CSV hard (commas, quotes, semicolons, line breaks).
const WORDS: &[&str] = &[
    "Renée",
    "Zoë",
    "Jürgen",
    "Søren",
    "Françoise",
    "Ñuño",
    "José",
    "Müller",
    "Ångström",
    "Dupré",
    "O'Brien",
    "Smith, Jr.",
    "\"Bud\"",
    "Ærø",
    "Œuvre",
    "Straße",
    "Þór",
    "Ça va; oui",
    "12 Rue de l'Église",
    "Apt 3\nBuilding B",
    "Montréal",
    "Québec",
    "São Paulo",
    "Zürich",
    "Ada",
    "Lovelace",
    "Turing",
    "Hopper",
    "x",
    "Main St.",
    "Élodie",
    "Bjørn",
    "Ñandú",
];

#[derive(Debug, Clone, Copy)]
enum Enc {
    Utf8,
    Utf8Bom,
    Utf16LeBom,
    Windows1252,
}

fn value() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(WORDS), 1..4).prop_map(|w| w.join(" "))
}

fn users() -> impl Strategy<Value = Vec<[String; 4]>> {
    prop::collection::vec([value(), value(), value(), value()], 1..40)
}

fn encode(text: &str, enc: Enc) -> Vec<u8> {
    match enc {
        Enc::Utf8 => text.as_bytes().to_vec(),
        Enc::Utf8Bom => [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
        Enc::Utf16LeBom => {
            let mut out = vec![0xFF, 0xFE];
            for unit in text.encode_utf16() {
                out.extend_from_slice(&unit.to_le_bytes());
            }
            out
        }
        Enc::Windows1252 => {
            let (bytes, _, unmappable) = encoding_rs::WINDOWS_1252.encode(text);
            assert!(!unmappable, "the word list is Windows-1252");
            bytes.into_owned()
        }
    }
}

/// Each checked row's unique_id and text values, as the worker reads them.
fn read_back(bytes: Vec<u8>) -> Vec<(String, Vec<Option<String>>)> {
    let mut cur = Cursor::new(bytes);
    let sniff = reader::sniff(&mut cur, None).unwrap();
    let rules = TenantRules::new(vec!["sso".into()], vec![]);
    let mut out = Vec::new();
    let outcome = reader::read_chunks(
        cur,
        &sniff,
        Limits::default(),
        reader::Chunking::rows(7),
        |_, _, _| {},
        |_, header, map, rows| {
            for raw in rows {
                let user = validate::validate(header, map, &raw, &rules)
                    .unwrap_or_else(|e| panic!("row {} refused: {e:?}", raw.row));
                out.push((
                    user.unique_id.to_owned(),
                    user.text.iter().map(|t| t.map(str::to_owned)).collect(),
                ));
            }
            Ok(())
        },
    )
    .unwrap();
    outcome.unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn valid_users_import_back_identically(
        users in users(),
        delimiter in prop::sample::select(vec![b',', b';', b'\t']),
        crlf in any::<bool>(),
        enc in prop::sample::select(vec![Enc::Utf8, Enc::Utf8Bom, Enc::Utf16LeBom, Enc::Windows1252]),
    ) {
        let mut w = csv::WriterBuilder::new()
            .delimiter(delimiter)
            .terminator(if crlf { csv::Terminator::CRLF } else { csv::Terminator::Any(b'\n') })
            .from_writer(Vec::new());
        w.write_record(["unique_id", "login_source", "first_name", "last_name", "street", "city"]).unwrap();
        for (i, u) in users.iter().enumerate() {
            let id = format!("u{i}");
            w.write_record([id.as_str(), "sso", &u[0], &u[1], &u[2], &u[3]]).unwrap();
        }
        let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
        let back = read_back(encode(&text, enc));
        prop_assert_eq!(back.len(), users.len());
        for (i, (got, want)) in back.iter().zip(&users).enumerate() {
            let (id, text) = got;
            prop_assert_eq!(id, &format!("u{i}"));
            prop_assert_eq!(text[0].as_deref(), Some(want[0].as_str()));
            prop_assert_eq!(text[1].as_deref(), Some(want[1].as_str()));
            prop_assert_eq!(text[4].as_deref(), Some(want[2].as_str()));
            prop_assert_eq!(text[5].as_deref(), Some(want[3].as_str()));
        }
    }
}
