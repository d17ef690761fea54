//! The fields of one uploaded row, kept in one buffer: the text of every field one after the
//! other, and where each ends. A row of 22 fields is two allocations instead of 23, in ingest
//! (which reads it) and in the worker (which decodes it from the chunk message). On the wire
//! it is what a `Vec<String>` is: a JSON array of strings.

use std::fmt;

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The fields of a row, in upload order.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// Every field's text, one after the other.
    text: String,
    /// Where each field ends in `text`.
    ends: Vec<u32>,
}

impl Fields {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// No fields yet, with room for `fields` of `bytes` in all.
    pub fn with_capacity(fields: usize, bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(fields),
        }
    }

    /// Appends a field.
    ///
    /// # Panics
    /// If the row's text would exceed 4 GiB (a row is bounded far below that by ingest).
    pub fn push(&mut self, field: &str) {
        self.text.push_str(field);
        self.ends
            .push(u32::try_from(self.text.len()).expect("a row under 4 GiB"));
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The field at `i`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1] as usize,
        };
        self.text.get(start..end)
    }

    /// The fields in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + '_ {
        (0..self.ends.len()).map(move |i| self.get(i).unwrap_or(""))
    }

    /// The fields as strings of their own (for a failure record).
    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }

    /// Bytes of text of all fields.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }
}

impl std::ops::Index<usize> for Fields {
    type Output = str;

    /// The field at `i`; panics if there is none (as a `Vec` does).
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(f) => f,
            None => panic!("field {i} of a row of {} fields", self.len()),
        }
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Fields {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut fields = Fields::new();
        for s in iter {
            fields.push(s.as_ref());
        }
        fields
    }
}

impl From<Vec<String>> for Fields {
    fn from(v: Vec<String>) -> Self {
        v.iter().collect()
    }
}

impl<S: AsRef<str>> PartialEq<[S]> for Fields {
    fn eq(&self, other: &[S]) -> bool {
        self.len() == other.len() && self.iter().zip(other).all(|(a, b)| a == b.as_ref())
    }
}

impl<S: AsRef<str>> PartialEq<Vec<S>> for Fields {
    fn eq(&self, other: &Vec<S>) -> bool {
        *self == other[..]
    }
}

impl Serialize for Fields {
    fn serialize<Se: Serializer>(&self, s: Se) -> Result<Se::Ok, Se::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Fields, A::Error> {
        // Room for a typical row, so that few rows grow their buffers more than once.
        let mut fields = Fields::with_capacity(seq.size_hint().unwrap_or(32), 256);
        // Each string is appended to the buffer as the parser hands it over, borrowed or from
        // its scratch space (escapes), without a string of its own.
        while seq.next_element_seed(Append(&mut fields))?.is_some() {}
        Ok(fields)
    }
}

/// Appends the next string of the array to the row's buffer.
struct Append<'f>(&'f mut Fields);

impl<'de> DeserializeSeed<'de> for Append<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Append<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.0.text.len() + v.len() > u32::MAX as usize {
            return Err(E::custom("a row of more than 4 GiB"));
        }
        self.0.push(v);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_as_pushed_including_empty_ones() {
        let f: Fields = ["a", "", "Renée", ""].into_iter().collect();
        assert_eq!(f.len(), 4);
        assert_eq!(f.get(0), Some("a"));
        assert_eq!(f.get(1), Some(""));
        assert_eq!(&f[2], "Renée");
        assert_eq!(f.get(3), Some(""));
        assert_eq!(f.get(4), None);
        assert_eq!(f.to_vec(), vec!["a", "", "Renée", ""]);
        assert_eq!(f.iter().next_back(), Some(""));
        assert!(Fields::new().is_empty());
    }

    #[test]
    fn on_the_wire_fields_are_an_array_of_strings() {
        let v = vec![
            "u1".to_owned(),
            "a \"quoted\" \\ value\n".to_owned(),
            String::new(),
            "Zoë".to_owned(),
        ];
        let fields = Fields::from(v.clone());
        let json = serde_json::to_string(&fields).unwrap();
        assert_eq!(json, serde_json::to_string(&v).unwrap());
        let back: Fields = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
        let from_slice: Fields = serde_json::from_slice(json.as_bytes()).unwrap();
        assert_eq!(from_slice, fields);
    }

    #[test]
    fn anything_but_an_array_of_strings_is_refused() {
        assert!(serde_json::from_str::<Fields>(r#"["a", 1]"#).is_err());
        assert!(serde_json::from_str::<Fields>(r#""a""#).is_err());
        assert!(serde_json::from_str::<Fields>(r#"["a", null]"#).is_err());
        assert_eq!(serde_json::from_str::<Fields>("[]").unwrap().len(), 0);
    }
}
