//! An entry's indexed fields as the shard stores them: one compact blob, fields ordered by
//! name, kept in the entry's allocation between key and value (`store`), and written as is
//! to the log and snapshots (`docs/storage.md`, "Fields").
//!
//! ```text
//! count      u8                       1..=FIELDS_PER_VALUE_MAX (no fields: no blob at all)
//! per field, by name in byte order:
//!   name size u8, name bytes (UTF-8)
//!   tag       u8                      1 string, 2 i64, 3 f64, 4 bool, 5 timestamp
//!   string:   u16 size, bytes (UTF-8); i64, f64 (bits), timestamp: 8 bytes LE; bool: 1 byte
//! ```
//!
//! Blobs the shard wrote itself are valid; one read from disk is checked by [`decode`]
//! before it is stored (recovery refuses a bad one as damage).

use tessera_protocol::limits::{FIELDS_PER_VALUE_MAX, FIELD_NAME_SIZE_MAX, FIELD_STRING_SIZE_MAX};
use tessera_protocol::query::{ArchivedField, ArchivedFieldValue, F64};
use tessera_protocol::{Field, FieldValue};

const TAG_STR: u8 = 1;
const TAG_I64: u8 = 2;
const TAG_F64: u8 = 3;
const TAG_BOOL: u8 = 4;
const TAG_TIMESTAMP: u8 = 5;

/// Largest blob: every field with the longest name and string.
pub const FIELDS_BLOB_SIZE_MAX: usize =
    1 + FIELDS_PER_VALUE_MAX * (1 + FIELD_NAME_SIZE_MAX + 1 + 2 + FIELD_STRING_SIZE_MAX);

/// A blob that is not one this module writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fields blob: {0}")]
pub struct FieldsError(&'static str);

/// One field, borrowed from a request or a blob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// Text.
    Str(&'a str),
    /// An integer.
    I64(i64),
    /// A float's bits.
    F64(u64),
    /// A boolean.
    Bool(bool),
    /// Milliseconds since the epoch.
    Timestamp(i64),
}

impl ValueRef<'_> {
    /// The value, owned.
    pub fn to_value(self) -> FieldValue {
        match self {
            Self::Str(text) => FieldValue::Str(text.to_owned()),
            Self::I64(number) => FieldValue::I64(number),
            // Only valid floats are written, so the fallback is never taken.
            Self::F64(bits) => {
                F64::new(f64::from_bits(bits)).map_or(FieldValue::I64(0), FieldValue::F64)
            }
            Self::Bool(value) => FieldValue::Bool(value),
            Self::Timestamp(ms) => FieldValue::Timestamp(ms),
        }
    }

    fn of(value: &FieldValue) -> ValueRef<'_> {
        match value {
            FieldValue::Str(text) => ValueRef::Str(text),
            FieldValue::I64(number) => ValueRef::I64(*number),
            FieldValue::F64(number) => ValueRef::F64(number.get().to_bits()),
            FieldValue::Bool(value) => ValueRef::Bool(*value),
            FieldValue::Timestamp(ms) => ValueRef::Timestamp(*ms),
        }
    }

    fn of_archived(value: &ArchivedFieldValue) -> ValueRef<'_> {
        match value {
            ArchivedFieldValue::Str(text) => ValueRef::Str(text.as_str()),
            ArchivedFieldValue::I64(number) => ValueRef::I64(number.to_native()),
            ArchivedFieldValue::F64(number) => ValueRef::F64(number.get().to_bits()),
            ArchivedFieldValue::Bool(value) => ValueRef::Bool(*value),
            ArchivedFieldValue::Timestamp(ms) => ValueRef::Timestamp(ms.to_native()),
        }
    }
}

/// Encodes fields (already checked: sizes, unique names) into `out`, which is cleared. No
/// fields give an empty blob.
fn encode<'a>(mut fields: Vec<(&'a str, ValueRef<'a>)>, out: &mut Vec<u8>) {
    out.clear();
    if fields.is_empty() {
        return;
    }
    fields.sort_unstable_by(|left, right| left.0.cmp(right.0));
    // Checked before: at most FIELDS_PER_VALUE_MAX fields, names and strings within limits.
    out.push(u8::try_from(fields.len()).unwrap_or(u8::MAX));
    for (name, value) in fields {
        out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(name.as_bytes());
        match value {
            ValueRef::Str(text) => {
                out.push(TAG_STR);
                out.extend_from_slice(&u16::try_from(text.len()).unwrap_or(u16::MAX).to_le_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            ValueRef::I64(number) => {
                out.push(TAG_I64);
                out.extend_from_slice(&number.to_le_bytes());
            }
            ValueRef::F64(bits) => {
                out.push(TAG_F64);
                out.extend_from_slice(&bits.to_le_bytes());
            }
            ValueRef::Bool(value) => {
                out.push(TAG_BOOL);
                out.push(u8::from(value));
            }
            ValueRef::Timestamp(ms) => {
                out.push(TAG_TIMESTAMP);
                out.extend_from_slice(&ms.to_le_bytes());
            }
        }
    }
}

/// Encodes a request's checked fields into `out`.
pub fn encode_archived(fields: &[ArchivedField], out: &mut Vec<u8>) {
    encode(
        fields
            .iter()
            .map(|field| (field.name.as_str(), ValueRef::of_archived(&field.value)))
            .collect(),
        out,
    );
}

/// The size of the blob [`encode_archived`] writes for `fields`, without writing it.
pub fn encoded_size_archived(fields: &[ArchivedField]) -> usize {
    if fields.is_empty() {
        return 0;
    }
    1 + fields
        .iter()
        .map(|field| {
            let payload = match &field.value {
                ArchivedFieldValue::Str(text) => 2 + text.len(),
                ArchivedFieldValue::Bool(_) => 1,
                ArchivedFieldValue::I64(_)
                | ArchivedFieldValue::F64(_)
                | ArchivedFieldValue::Timestamp(_) => 8,
            };
            2 + field.name.len() + payload
        })
        .sum::<usize>()
}

/// Encodes checked owned fields into `out` (tests and embedded callers).
pub fn encode_owned(fields: &[Field], out: &mut Vec<u8>) {
    encode(
        fields
            .iter()
            .map(|field| (field.name.as_str(), ValueRef::of(&field.value)))
            .collect(),
        out,
    );
}

/// A blob's fields, borrowed: on the stack for up to 8.
pub type Decoded<'a> = smallvec::SmallVec<[(&'a str, ValueRef<'a>); 8]>;

/// The fields of a blob, in name order, borrowed.
///
/// # Errors
/// The blob is cut short, has trailing bytes, an unknown tag, a name out of order or of a
/// bad size, invalid UTF-8 or a NaN.
pub fn decode(blob: &[u8]) -> Result<Decoded<'_>, FieldsError> {
    let mut fields = Decoded::new();
    if blob.is_empty() {
        return Ok(fields);
    }
    let mut reader = Reader { rest: blob };
    let count = usize::from(reader.byte()?);
    if count == 0 || count > FIELDS_PER_VALUE_MAX {
        return Err(FieldsError("field count out of range"));
    }
    fields.reserve(count);
    for _ in 0..count {
        let name_size = usize::from(reader.byte()?);
        if name_size == 0 || name_size > FIELD_NAME_SIZE_MAX {
            return Err(FieldsError("field name size out of range"));
        }
        let name = reader.text(name_size)?;
        if fields
            .last()
            .is_some_and(|(previous, _): &(&str, ValueRef<'_>)| *previous >= name)
        {
            return Err(FieldsError("field names out of order"));
        }
        let value = match reader.byte()? {
            TAG_STR => {
                let size = usize::from(u16::from_le_bytes(reader.array()?));
                if size > FIELD_STRING_SIZE_MAX {
                    return Err(FieldsError("string over its limit"));
                }
                ValueRef::Str(reader.text(size)?)
            }
            TAG_I64 => ValueRef::I64(i64::from_le_bytes(reader.array()?)),
            TAG_F64 => {
                let bits = u64::from_le_bytes(reader.array()?);
                if F64::new(f64::from_bits(bits)).map(|valid| valid.get().to_bits()) != Some(bits) {
                    return Err(FieldsError("f64 is NaN or -0.0"));
                }
                ValueRef::F64(bits)
            }
            TAG_BOOL => match reader.byte()? {
                0 => ValueRef::Bool(false),
                1 => ValueRef::Bool(true),
                _ => return Err(FieldsError("bool is neither 0 nor 1")),
            },
            TAG_TIMESTAMP => ValueRef::Timestamp(i64::from_le_bytes(reader.array()?)),
            _ => return Err(FieldsError("unknown value tag")),
        };
        fields.push((name, value));
    }
    if !reader.rest.is_empty() {
        return Err(FieldsError("trailing bytes"));
    }
    Ok(fields)
}

/// The fields of a blob the shard wrote, owned (a blob that does not decode, which the
/// shard never stores, gives none).
pub fn to_fields(blob: &[u8]) -> Vec<Field> {
    if blob.is_empty() {
        return Vec::new();
    }
    decode(blob)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| Field::new(name, value.to_value()))
        .collect()
}

/// Decoded fields, borrowing their names from the blob: what a query checks an entry with.
/// Only string values allocate.
pub type Values<'a> = smallvec::SmallVec<[(&'a str, FieldValue); 8]>;

/// The fields of a blob the shard wrote, as [`Values`] (none if it does not decode).
pub fn values(blob: &[u8]) -> Values<'_> {
    decode(blob)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| (name, value.to_value()))
        .collect()
}

/// The value of `name` among decoded fields.
pub fn value_in<'v>(values: &'v Values<'_>, name: &str) -> Option<&'v FieldValue> {
    values
        .iter()
        .find(|(field, _)| *field == name)
        .map(|(_, value)| value)
}

/// The value of field `name` in a blob the shard wrote.
pub fn lookup<'a>(blob: &'a [u8], name: &str) -> Option<ValueRef<'a>> {
    decode(blob)
        .ok()?
        .into_iter()
        .find(|(field, _)| *field == name)
        .map(|(_, value)| value)
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, size: usize) -> Result<&'a [u8], FieldsError> {
        if self.rest.len() < size {
            return Err(FieldsError("cut short"));
        }
        let (taken, rest) = self.rest.split_at(size);
        self.rest = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, FieldsError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FieldsError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn text(&mut self, size: usize) -> Result<&'a str, FieldsError> {
        std::str::from_utf8(self.take(size)?).map_err(|_| FieldsError("name or string not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float(value: f64) -> FieldValue {
        FieldValue::F64(F64::new(value).unwrap())
    }

    #[test]
    fn fields_round_trip_in_name_order() {
        let fields = vec![
            Field::new("name", FieldValue::Str("Ada".to_owned())),
            Field::new("age", FieldValue::I64(36)),
            Field::new("score", float(-1.5)),
            Field::new("active", FieldValue::Bool(true)),
            Field::new("born", FieldValue::Timestamp(-4_000_000_000_000)),
        ];
        let mut blob = Vec::new();
        encode_owned(&fields, &mut blob);
        let mut sorted = fields.clone();
        sorted.sort_by(|left, right| left.name.cmp(&right.name));
        assert_eq!(to_fields(&blob), sorted);
        assert_eq!(lookup(&blob, "age"), Some(ValueRef::I64(36)));
        assert_eq!(lookup(&blob, "missing"), None);
        encode_owned(&[], &mut blob);
        assert!(blob.is_empty());
        assert_eq!(to_fields(&blob), []);
    }

    #[test]
    fn damaged_blobs_are_refused() {
        let mut blob = Vec::new();
        encode_owned(
            &[
                Field::new("a", FieldValue::Str("x".to_owned())),
                Field::new("b", FieldValue::Bool(false)),
            ],
            &mut blob,
        );
        assert!(decode(&blob).is_ok());
        for cut in 0..blob.len() - 1 {
            if cut > 0 {
                assert!(decode(&blob[..cut]).is_err(), "cut at {cut}");
            }
        }
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        let mut bad_bool = blob.clone();
        *bad_bool.last_mut().unwrap() = 2;
        assert!(decode(&bad_bool).is_err());
        // A NaN float.
        let mut nan = vec![1, 1, b'f', TAG_F64];
        nan.extend_from_slice(&f64::NAN.to_bits().to_le_bytes());
        assert!(decode(&nan).is_err());
        // Names out of order.
        let unordered = [2, 1, b'b', TAG_BOOL, 0, 1, b'a', TAG_BOOL, 1];
        assert!(decode(&unordered).is_err());
        assert!(blob.len() <= FIELDS_BLOB_SIZE_MAX);
    }
}
