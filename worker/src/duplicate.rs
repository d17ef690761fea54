//! Reporting a row that lost to another row of the same `unique_id` of its file: the later
//! row wins, the earlier is a `duplicate_unique_id` failure. Found within a chunk by
//! [`crate::import`], across chunks by [`crate::upsert`].

use mui_shared::domain::{Column, HeaderMap};
use mui_shared::messages::{self, RowError, RowErrorCode, RowFailure};

/// The failure record of `row`, which lost to row `winner`; `stored`: `fields` are the
/// values this row had written (a later row of another chunk took its place), not the
/// uploaded ones.
pub(crate) fn duplicate_failure(
    row: u64,
    fields: Vec<String>,
    unique_id: &str,
    winner: u64,
    map: &HeaderMap,
    header: &[String],
    stored: bool,
) -> RowFailure {
    let label = map
        .position(Column::UniqueId)
        .and_then(|i| header.get(i))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "unique_id".to_owned());
    let mut message = format!(
        "`{label}` \"{}\" appears again in row {winner}; the later row wins and this one was not kept",
        messages::truncate_for_message(unique_id, 60)
    );
    if stored {
        message.push_str(" (values shown as they were stored from this row)");
    }
    RowFailure {
        row,
        fields,
        errors: vec![RowError {
            code: RowErrorCode::DuplicateUniqueId,
            column: Some(label),
            message,
        }],
    }
}

/// The stored values of a user (`to_jsonb` of its `users` row), laid out like the uploaded header.
pub(crate) fn stored_fields(
    old: Option<&serde_json::Value>,
    map: &HeaderMap,
    header: &[String],
) -> Vec<String> {
    (0..header.len())
        .map(|i| {
            let Some(Some(col)) = map.positions.get(i) else {
                return String::new();
            };
            match old.and_then(|o| o.get(col.name())) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Bool(b)) => if *b { "1" } else { "0" }.to_owned(),
                Some(serde_json::Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        })
        .collect()
}
