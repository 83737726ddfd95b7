//! Query expressions over an entry's indexed fields (issue 8): typed field values, the
//! predicate tree as it travels (flat, children before parents), its checks, its evaluation,
//! and the readable syntax `tessera query` takes (`age >= 20 and age < 30 and city = "Oslo"`),
//! parsed and printed here so client, server and tests agree on it.
//!
//! Semantics, in `docs/query.md`:
//! - A comparison holds only when the entry has the field and the field's value is of a
//!   comparable type: strings with strings (byte order), numbers with numbers (`i64` and
//!   `f64` compare by value), booleans with booleans, timestamps with timestamps. Anything
//!   else is not a match, so `not (age = "20")` holds for an entry whose `age` is the number 20.
//! - `f64` values are never NaN, and `-0.0` is `0.0`, so every number has one place in the
//!   order.
//!
//! **Invariant:** a [`Query`] that passed [`check_query`] has 1..=[`QUERY_NODES_MAX`] nodes,
//! every operator refers only to nodes before it, and the last node is the root; evaluation
//! is one pass over the nodes in order, with no recursion and no allocation.

// The rkyv derive generates resolver and archived types for struct-like enum variants whose
// fields carry no docs; every type written here is documented.
#![allow(missing_docs)]

use std::cmp::Ordering;
use std::fmt::{self, Write as _};

use crate::error::RequestError;
use crate::limits::{
    FIELDS_PER_VALUE_MAX, FIELD_NAME_SIZE_MAX, FIELD_STRING_SIZE_MAX, QUERY_IN_VALUES_MAX,
    QUERY_NODES_MAX, QUERY_TEXT_SIZE_MAX,
};

/// An `f64` that is never NaN and has one zero, so values are totally ordered and equal by
/// their bits.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub struct F64 {
    bits: u64,
}

impl F64 {
    /// The number, or `None` for NaN; `-0.0` becomes `0.0`.
    pub fn new(value: f64) -> Option<Self> {
        if value.is_nan() {
            None
        } else {
            // Adding 0.0 turns -0.0 into 0.0 and leaves everything else as it is.
            Some(Self {
                bits: (value + 0.0).to_bits(),
            })
        }
    }

    /// The number.
    pub fn get(self) -> f64 {
        f64::from_bits(self.bits)
    }
}

/// The value of one indexed field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum FieldValue {
    /// Text, compared byte by byte.
    Str(String),
    /// A signed integer.
    I64(i64),
    /// A floating-point number (never NaN).
    F64(F64),
    /// `true` or `false` (`false` sorts first).
    Bool(bool),
    /// Milliseconds since the Unix epoch (UTC).
    Timestamp(i64),
}

impl FieldValue {
    /// How `self` compares with `other`, or `None` when their types do not compare.
    pub fn compare(&self, other: &FieldValue) -> Option<Ordering> {
        match (self, other) {
            (Self::Str(a), Self::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Self::I64(a), Self::I64(b)) | (Self::Timestamp(a), Self::Timestamp(b)) => {
                Some(a.cmp(b))
            }
            (Self::F64(a), Self::F64(b)) => Some(a.get().total_cmp(&b.get())),
            (Self::I64(a), Self::F64(b)) => Some(compare_integer_float(*a, b.get())),
            (Self::F64(a), Self::I64(b)) => Some(compare_integer_float(*b, a.get()).reverse()),
            (Self::Bool(a), Self::Bool(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// The name of its type, for errors and `explain`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Str(_) => "string",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
            Self::Bool(_) => "bool",
            Self::Timestamp(_) => "timestamp",
        }
    }
}

impl FieldValue {
    /// Where the value's type sorts among the others: strings, numbers (`i64` and `f64`
    /// together), booleans, timestamps.
    pub fn type_rank(&self) -> u8 {
        match self {
            Self::Str(_) => 0,
            Self::I64(_) | Self::F64(_) => 1,
            Self::Bool(_) => 2,
            Self::Timestamp(_) => 3,
        }
    }

    /// A total order over every value: by [`FieldValue::type_rank`], then within a type by
    /// [`FieldValue::compare`]. Indexes and `order_by` sort by it; `2` and `2.0` are equal.
    pub fn total_cmp(&self, other: &FieldValue) -> Ordering {
        self.type_rank()
            .cmp(&other.type_rank())
            .then_with(|| self.compare(other).unwrap_or(Ordering::Equal))
    }

    /// Whether the value may be stored or sent: a string within [`FIELD_STRING_SIZE_MAX`],
    /// an `f64` that is not NaN and not `-0.0` (bits from the wire are not trusted).
    pub fn is_valid(&self) -> bool {
        match self {
            Self::Str(text) => text.len() <= FIELD_STRING_SIZE_MAX,
            Self::F64(number) => F64::new(number.get()) == Some(*number),
            Self::I64(_) | Self::Bool(_) | Self::Timestamp(_) => true,
        }
    }
}

/// How one sort key of a query result compares with another: a value before no value
/// (entries without the field sort last), values by [`FieldValue::total_cmp`].
pub fn sort_value_cmp(left: Option<&FieldValue>, right: Option<&FieldValue>) -> Ordering {
    match (left, right) {
        (Some(left), Some(right)) => left.total_cmp(right),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// One indexed field of an entry: a name (1..=[`FIELD_NAME_SIZE_MAX`] bytes) and its value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Field {
    /// The name.
    pub name: String,
    /// The value.
    pub value: FieldValue,
}

impl Field {
    /// A field named `name` holding `value`.
    pub fn new(name: impl Into<String>, value: FieldValue) -> Self {
        Self {
            name: name.into(),
            value,
        }
    }
}

impl ArchivedF64 {
    /// The number, as stored (bits from the wire may be NaN or `-0.0`).
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.to_native())
    }
}

impl ArchivedFieldValue {
    /// The value, owned.
    pub fn to_owned_value(&self) -> FieldValue {
        match self {
            Self::Str(text) => FieldValue::Str(text.as_str().to_owned()),
            Self::I64(number) => FieldValue::I64(number.to_native()),
            Self::F64(number) => FieldValue::F64(F64 {
                bits: number.bits.to_native(),
            }),
            Self::Bool(value) => FieldValue::Bool(*value),
            Self::Timestamp(ms) => FieldValue::Timestamp(ms.to_native()),
        }
    }
}

impl ArchivedField {
    /// The field, owned.
    pub fn to_field(&self) -> Field {
        Field::new(self.name.as_str(), self.value.to_owned_value())
    }
}

/// Checks an entry's archived fields: at most [`FIELDS_PER_VALUE_MAX`], every name
/// 1..=[`FIELD_NAME_SIZE_MAX`] bytes and given once, every value valid
/// ([`FieldValue::is_valid`]).
///
/// # Errors
/// The first rule broken.
pub fn check_fields(fields: &[ArchivedField]) -> Result<(), RequestError> {
    if fields.len() > FIELDS_PER_VALUE_MAX {
        return Err(RequestError::TooManyFields {
            count: fields.len(),
            count_max: FIELDS_PER_VALUE_MAX,
        });
    }
    for (index, field) in fields.iter().enumerate() {
        let name = field.name.as_str();
        let bad = |reason: String| RequestError::BadField {
            name: shown_name(name),
            reason,
        };
        if name.is_empty() || name.len() > FIELD_NAME_SIZE_MAX {
            return Err(bad(format!(
                "a name has 1..={FIELD_NAME_SIZE_MAX} bytes, this one {}",
                name.len()
            )));
        }
        if fields[..index]
            .iter()
            .any(|earlier| earlier.name.as_str() == name)
        {
            return Err(bad("the name is given twice".to_owned()));
        }
        match &field.value {
            ArchivedFieldValue::Str(text) if text.len() > FIELD_STRING_SIZE_MAX => {
                return Err(bad(format!(
                    "a string of {} bytes is over the limit of {FIELD_STRING_SIZE_MAX}",
                    text.len()
                )));
            }
            ArchivedFieldValue::F64(number)
                if F64::new(number.get()).map(|valid| valid.bits)
                    != Some(number.bits.to_native()) =>
            {
                return Err(bad("an f64 is NaN or -0.0".to_owned()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A name as an error shows it: cut to [`FIELD_NAME_SIZE_MAX`] bytes at a character boundary.
pub fn shown_name(name: &str) -> String {
    let mut end = name.len().min(FIELD_NAME_SIZE_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// `integer` against `float` by value, exactly (no rounding of large integers).
fn compare_integer_float(integer: i64, float: f64) -> Ordering {
    // i64 spans [-2^63, 2^63); floats outside it compare by sign alone.
    #[allow(clippy::cast_precision_loss, reason = "2^63 is exact in f64")]
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    if float >= TWO_TO_63 {
        return Ordering::Less;
    }
    if float < -TWO_TO_63 {
        return Ordering::Greater;
    }
    let truncated = float.trunc();
    // In range, so the conversion is exact.
    #[allow(clippy::cast_possible_truncation, reason = "checked to be within i64")]
    let whole = truncated as i64;
    match integer.cmp(&whole) {
        Ordering::Equal if float > truncated => Ordering::Less,
        Ordering::Equal if float < truncated => Ordering::Greater,
        other => other,
    }
}

/// One end of a range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum Bound {
    /// No limit on this side.
    Unbounded,
    /// The value itself is in the range.
    Included(FieldValue),
    /// The value itself is not.
    Excluded(FieldValue),
}

/// One node of a query: a comparison of one field, or an operator over earlier nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub enum QueryNode {
    /// The field equals the value.
    Equal {
        /// The field.
        field: String,
        /// The value.
        value: FieldValue,
    },
    /// The field equals one of the values.
    In {
        /// The field.
        field: String,
        /// The values (1..=`QUERY_IN_VALUES_MAX`).
        values: Vec<FieldValue>,
    },
    /// The field is within the bounds (both unbounded: the field exists).
    Range {
        /// The field.
        field: String,
        /// The lower end.
        lower: Bound,
        /// The upper end.
        upper: Bound,
    },
    /// The field is a string starting with `prefix`.
    Prefix {
        /// The field.
        field: String,
        /// The prefix.
        prefix: String,
    },
    /// Every listed node holds.
    And(Vec<u16>),
    /// At least one listed node holds.
    Or(Vec<u16>),
    /// The listed node does not hold.
    Not(u16),
}

/// A predicate over an entry's fields: nodes in order, each operator after its operands, the
/// last node the whole predicate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(derive(Debug))]
pub struct Query {
    /// The nodes; the last one is the root.
    pub nodes: Vec<QueryNode>,
}

/// Why a query cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No node, or more than the limit.
    #[error("a query has 1..={QUERY_NODES_MAX} nodes, this one {count}")]
    NodeCount {
        /// Nodes found.
        count: usize,
    },
    /// An operator names itself, a later node, or nothing.
    #[error("query node {node} refers to node {operand}, which does not come before it")]
    Operand {
        /// The operator's index.
        node: usize,
        /// The operand it names.
        operand: u16,
    },
    /// A field name is empty or too long.
    #[error("field name of {size} bytes (allowed 1..={FIELD_NAME_SIZE_MAX})")]
    FieldName {
        /// Its size.
        size: usize,
    },
    /// A string value is too long.
    #[error("string value of {size} bytes (allowed {FIELD_STRING_SIZE_MAX})")]
    StringSize {
        /// Its size.
        size: usize,
    },
    /// `In` with no value, or more than the limit.
    #[error("`in` takes 1..={QUERY_IN_VALUES_MAX} values, not {count}")]
    InCount {
        /// Values found.
        count: usize,
    },
    /// An `f64` value is NaN or `-0.0` (only bits from the wire can be).
    #[error("f64 value with bits {bits:#018x} is NaN or -0.0")]
    Float {
        /// Its bits.
        bits: u64,
    },
    /// The text could not be parsed.
    #[error("at byte {position}: {message}")]
    Syntax {
        /// Where, in bytes from the start.
        position: usize,
        /// What was wrong.
        message: String,
    },
}

/// Checks a query's sizes and structure (see the module invariant).
///
/// # Errors
/// The first rule the query breaks.
pub fn check_query(query: &Query) -> Result<(), QueryError> {
    let count = query.nodes.len();
    if count == 0 || count > QUERY_NODES_MAX {
        return Err(QueryError::NodeCount { count });
    }
    for (index, node) in query.nodes.iter().enumerate() {
        let check_operand = |operand: u16| {
            if usize::from(operand) < index {
                Ok(())
            } else {
                Err(QueryError::Operand {
                    node: index,
                    operand,
                })
            }
        };
        match node {
            QueryNode::Equal { field, value } => {
                check_field(field)?;
                check_value(value)?;
            }
            QueryNode::In { field, values } => {
                check_field(field)?;
                if values.is_empty() || values.len() > QUERY_IN_VALUES_MAX {
                    return Err(QueryError::InCount {
                        count: values.len(),
                    });
                }
                values.iter().try_for_each(check_value)?;
            }
            QueryNode::Range {
                field,
                lower,
                upper,
            } => {
                check_field(field)?;
                for bound in [lower, upper] {
                    if let Bound::Included(value) | Bound::Excluded(value) = bound {
                        check_value(value)?;
                    }
                }
            }
            QueryNode::Prefix { field, prefix } => {
                check_field(field)?;
                check_string(prefix)?;
            }
            QueryNode::And(operands) | QueryNode::Or(operands) => {
                if operands.is_empty() {
                    return Err(QueryError::Operand {
                        node: index,
                        operand: u16::MAX,
                    });
                }
                operands.iter().copied().try_for_each(check_operand)?;
            }
            QueryNode::Not(operand) => check_operand(*operand)?,
        }
    }
    Ok(())
}

fn check_field(field: &str) -> Result<(), QueryError> {
    if field.is_empty() || field.len() > FIELD_NAME_SIZE_MAX {
        return Err(QueryError::FieldName { size: field.len() });
    }
    Ok(())
}

fn check_string(text: &str) -> Result<(), QueryError> {
    if text.len() > FIELD_STRING_SIZE_MAX {
        return Err(QueryError::StringSize { size: text.len() });
    }
    Ok(())
}

fn check_value(value: &FieldValue) -> Result<(), QueryError> {
    match value {
        FieldValue::Str(text) => check_string(text),
        FieldValue::F64(number) if !value.is_valid() => Err(QueryError::Float {
            bits: number.get().to_bits(),
        }),
        _ => Ok(()),
    }
}

impl Bound {
    fn admits_above(&self, value: &FieldValue) -> bool {
        match self {
            Self::Unbounded => true,
            Self::Included(lower) => {
                matches!(
                    value.compare(lower),
                    Some(Ordering::Greater | Ordering::Equal)
                )
            }
            Self::Excluded(lower) => matches!(value.compare(lower), Some(Ordering::Greater)),
        }
    }

    fn admits_below(&self, value: &FieldValue) -> bool {
        match self {
            Self::Unbounded => true,
            Self::Included(upper) => {
                matches!(value.compare(upper), Some(Ordering::Less | Ordering::Equal))
            }
            Self::Excluded(upper) => matches!(value.compare(upper), Some(Ordering::Less)),
        }
    }
}

impl QueryNode {
    /// Whether a comparison node holds for `value` (the field's value, if the entry has it);
    /// operators are not comparisons and return `false`.
    fn compare_holds(&self, value: Option<&FieldValue>) -> bool {
        let Some(value) = value else {
            return false;
        };
        match self {
            Self::Equal { value: wanted, .. } => value.compare(wanted) == Some(Ordering::Equal),
            Self::In { values, .. } => values
                .iter()
                .any(|wanted| value.compare(wanted) == Some(Ordering::Equal)),
            Self::Range { lower, upper, .. } => {
                let comparable = |bound: &Bound| match bound {
                    Bound::Unbounded => true,
                    Bound::Included(end) | Bound::Excluded(end) => value.compare(end).is_some(),
                };
                comparable(lower)
                    && comparable(upper)
                    && lower.admits_above(value)
                    && upper.admits_below(value)
            }
            Self::Prefix { prefix, .. } => {
                matches!(value, FieldValue::Str(text) if text.as_bytes().starts_with(prefix.as_bytes()))
            }
            Self::And(_) | Self::Or(_) | Self::Not(_) => false,
        }
    }

    /// The field a comparison looks at.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Equal { field, .. }
            | Self::In { field, .. }
            | Self::Range { field, .. }
            | Self::Prefix { field, .. } => Some(field),
            Self::And(_) | Self::Or(_) | Self::Not(_) => None,
        }
    }
}

impl Query {
    /// Whether the predicate holds for an entry whose field `name` has `field(name)`. The
    /// query must have passed [`check_query`]; an unchecked one that breaks its rules is
    /// answered `false`.
    pub fn matches<'a>(&self, field: impl Fn(&str) -> Option<&'a FieldValue>) -> bool {
        let mut holds = [false; QUERY_NODES_MAX];
        if self.nodes.is_empty() || self.nodes.len() > QUERY_NODES_MAX {
            return false;
        }
        for (index, node) in self.nodes.iter().enumerate() {
            let operand = |operand: &u16| {
                let operand = usize::from(*operand);
                operand < index && holds[operand]
            };
            holds[index] = match node {
                QueryNode::And(operands) => operands.iter().all(operand),
                QueryNode::Or(operands) => operands.iter().any(operand),
                QueryNode::Not(target) => usize::from(*target) < index && !operand(target),
                comparison => comparison.compare_holds(comparison.field().and_then(&field)),
            };
        }
        holds[self.nodes.len() - 1]
    }

    /// The query in the readable syntax [`parse_query`] reads, with every operator
    /// parenthesized.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        if let Some(root) = self.nodes.len().checked_sub(1) {
            self.write_node(&mut text, root, 0);
        }
        text
    }

    fn write_node(&self, out: &mut String, index: usize, depth: usize) {
        let Some(node) = self.nodes.get(index) else {
            return;
        };
        // Operands come before their operator, so the depth is bounded by the node count.
        if depth > QUERY_NODES_MAX {
            return;
        }
        let join = |out: &mut String, operands: &[u16], word: &str| {
            out.push('(');
            for (position, operand) in operands.iter().enumerate() {
                if position > 0 {
                    let _ = write!(out, " {word} ");
                }
                if usize::from(*operand) < index {
                    self.write_node(out, usize::from(*operand), depth + 1);
                }
            }
            out.push(')');
        };
        match node {
            QueryNode::Equal { field, value } => {
                let _ = write!(out, "{field} = {}", ValueText(value));
            }
            QueryNode::In { field, values } => {
                let _ = write!(out, "{field} in (");
                for (position, value) in values.iter().enumerate() {
                    if position > 0 {
                        out.push_str(", ");
                    }
                    let _ = write!(out, "{}", ValueText(value));
                }
                out.push(')');
            }
            QueryNode::Range {
                field,
                lower,
                upper,
            } => {
                let lower_text = match lower {
                    Bound::Unbounded => None,
                    Bound::Included(value) => Some(format!("{field} >= {}", ValueText(value))),
                    Bound::Excluded(value) => Some(format!("{field} > {}", ValueText(value))),
                };
                let upper_text = match upper {
                    Bound::Unbounded => None,
                    Bound::Included(value) => Some(format!("{field} <= {}", ValueText(value))),
                    Bound::Excluded(value) => Some(format!("{field} < {}", ValueText(value))),
                };
                match (lower_text, upper_text) {
                    (Some(low), Some(high)) => {
                        let _ = write!(out, "({low} and {high})");
                    }
                    (Some(one), None) | (None, Some(one)) => out.push_str(&one),
                    (None, None) => {
                        let _ = write!(out, "{field} exists");
                    }
                }
            }
            QueryNode::Prefix { field, prefix } => {
                let _ = write!(
                    out,
                    "{field} prefix {}",
                    ValueText(&FieldValue::Str(prefix.clone()))
                );
            }
            QueryNode::And(operands) => join(out, operands, "and"),
            QueryNode::Or(operands) => join(out, operands, "or"),
            QueryNode::Not(operand) => {
                out.push_str("not ");
                if usize::from(*operand) < index {
                    out.push('(');
                    self.write_node(out, usize::from(*operand), depth + 1);
                    out.push(')');
                }
            }
        }
    }
}

/// A value in the query syntax.
struct ValueText<'a>(&'a FieldValue);

impl fmt::Display for ValueText<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            FieldValue::Str(text) => {
                formatter.write_char('"')?;
                for character in text.chars() {
                    match character {
                        '"' => formatter.write_str("\\\"")?,
                        '\\' => formatter.write_str("\\\\")?,
                        '\n' => formatter.write_str("\\n")?,
                        '\t' => formatter.write_str("\\t")?,
                        other => formatter.write_char(other)?,
                    }
                }
                formatter.write_char('"')
            }
            FieldValue::I64(number) => write!(formatter, "{number}"),
            FieldValue::F64(number) => {
                let value = number.get();
                if value.is_infinite() {
                    formatter.write_str(if value > 0.0 { "inf" } else { "-inf" })
                } else {
                    // `{:?}` always shows a point or an exponent, so it reads back as f64.
                    write!(formatter, "{value:?}")
                }
            }
            FieldValue::Bool(value) => write!(formatter, "{value}"),
            FieldValue::Timestamp(ms) => write!(formatter, "@{ms}"),
        }
    }
}

/// Parses the readable syntax into a checked query:
///
/// ```text
/// expr       := term ("or" term)*
/// term       := factor ("and" factor)*
/// factor     := "not" factor | "(" expr ")" | comparison
/// comparison := field ("=" | "!=" | "<" | "<=" | ">" | ">=") value
///             | field "in" "(" value ("," value)* ")"
///             | field "prefix" string
///             | field "between" value "and" value        (both ends included)
///             | field "exists"
/// value      := string | integer | float | "true" | "false" | "inf" | "-inf" | timestamp
/// timestamp  := "@" (milliseconds since the epoch | YYYY-MM-DD["T"hh:mm[:ss[.mmm]]]["Z"])
/// ```
///
/// Words (`and`, `or`, `not`, `in`, ...) are case-insensitive; a field is a letter or `_`
/// followed by letters, digits, `_`, `.` and `-`. A string is double-quoted, with `\"`,
/// `\\`, `\n` and `\t` escapes.
///
/// # Errors
/// [`QueryError::Syntax`] with the byte position, or a rule of [`check_query`].
pub fn parse_query(text: &str) -> Result<Query, QueryError> {
    if text.len() > QUERY_TEXT_SIZE_MAX {
        return Err(QueryError::Syntax {
            position: QUERY_TEXT_SIZE_MAX,
            message: format!("the query is longer than {QUERY_TEXT_SIZE_MAX} bytes"),
        });
    }
    let mut parser = Parser {
        text,
        position: 0,
        nodes: Vec::new(),
        depth: 0,
    };
    parser.expression()?;
    parser.skip_space();
    if parser.position < text.len() {
        return Err(parser.error("expected `and`, `or` or the end of the query"));
    }
    let query = Query {
        nodes: parser.nodes,
    };
    check_query(&query)?;
    Ok(query)
}

struct Parser<'a> {
    text: &'a str,
    position: usize,
    nodes: Vec<QueryNode>,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> QueryError {
        QueryError::Syntax {
            position: self.position,
            message: message.to_owned(),
        }
    }

    fn rest(&self) -> &str {
        &self.text[self.position..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.position = self.text.len() - trimmed.len();
    }

    /// Consumes `symbol` if it comes next.
    fn symbol(&mut self, symbol: &str) -> bool {
        self.skip_space();
        if self.rest().starts_with(symbol) {
            self.position += symbol.len();
            true
        } else {
            false
        }
    }

    /// Consumes the word `word` (case-insensitive, not followed by a field character).
    fn word(&mut self, word: &str) -> bool {
        self.skip_space();
        let rest = self.rest();
        let matches = rest.len() >= word.len()
            && rest.as_bytes()[..word.len()].eq_ignore_ascii_case(word.as_bytes())
            && !rest[word.len()..].starts_with(is_field_character);
        if matches {
            self.position += word.len();
        }
        matches
    }

    fn push(&mut self, node: QueryNode) -> Result<u16, QueryError> {
        if self.nodes.len() >= QUERY_NODES_MAX {
            return Err(self.error(&format!("more than {QUERY_NODES_MAX} query nodes")));
        }
        self.nodes.push(node);
        u16::try_from(self.nodes.len() - 1).map_err(|_| self.error("too many nodes"))
    }

    /// Operands joined by `word`, each parsed by `operand`; one operand stands alone.
    fn chain(
        &mut self,
        word: &str,
        operand: fn(&mut Self) -> Result<u16, QueryError>,
        make: fn(Vec<u16>) -> QueryNode,
    ) -> Result<u16, QueryError> {
        let first = operand(self)?;
        let mut operands = vec![first];
        while self.word(word) {
            operands.push(operand(self)?);
        }
        if operands.len() == 1 {
            Ok(first)
        } else {
            self.push(make(operands))
        }
    }

    fn expression(&mut self) -> Result<u16, QueryError> {
        self.chain("or", Self::term, QueryNode::Or)
    }

    fn term(&mut self) -> Result<u16, QueryError> {
        self.chain("and", Self::factor, QueryNode::And)
    }

    fn factor(&mut self) -> Result<u16, QueryError> {
        self.depth += 1;
        if self.depth > QUERY_NODES_MAX {
            return Err(self.error("the query nests too deeply"));
        }
        let node = if self.word("not") {
            let operand = self.factor()?;
            self.push(QueryNode::Not(operand))
        } else if self.symbol("(") {
            let inner = self.expression()?;
            if !self.symbol(")") {
                return Err(self.error("expected `)`"));
            }
            Ok(inner)
        } else {
            self.comparison()
        };
        self.depth -= 1;
        node
    }

    fn field(&mut self) -> Result<String, QueryError> {
        self.skip_space();
        let rest = self.rest();
        let starts_well = rest
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
        if !starts_well {
            return Err(self.error("expected a field name, `not` or `(`"));
        }
        let end = rest
            .find(|c: char| !is_field_character(c))
            .unwrap_or(rest.len());
        let field = rest[..end].to_owned();
        self.position += end;
        Ok(field)
    }

    fn comparison(&mut self) -> Result<u16, QueryError> {
        let field = self.field()?;
        if self.word("in") {
            if !self.symbol("(") {
                return Err(self.error("expected `(` after `in`"));
            }
            let mut values = vec![self.value()?];
            while self.symbol(",") {
                values.push(self.value()?);
            }
            if !self.symbol(")") {
                return Err(self.error("expected `,` or `)`"));
            }
            return self.push(QueryNode::In { field, values });
        }
        if self.word("prefix") {
            let at = self.position;
            return match self.value()? {
                FieldValue::Str(prefix) => self.push(QueryNode::Prefix { field, prefix }),
                other => Err(QueryError::Syntax {
                    position: at,
                    message: format!("`prefix` takes a string, not a {}", other.type_name()),
                }),
            };
        }
        if self.word("between") {
            let low = self.value()?;
            if !self.word("and") {
                return Err(self.error("expected `and` in `between ... and ...`"));
            }
            let high = self.value()?;
            return self.push(QueryNode::Range {
                field,
                lower: Bound::Included(low),
                upper: Bound::Included(high),
            });
        }
        if self.word("exists") {
            return self.push(QueryNode::Range {
                field,
                lower: Bound::Unbounded,
                upper: Bound::Unbounded,
            });
        }
        // Two-character operators first.
        let operator = ["!=", "<=", ">=", "==", "=", "<", ">"]
            .into_iter()
            .find(|operator| self.symbol(operator))
            .ok_or_else(|| {
                self.error("expected an operator: = != < <= > >= in prefix between exists")
            })?;
        let value = self.value()?;
        let range = |lower, upper| QueryNode::Range {
            field: field.clone(),
            lower,
            upper,
        };
        match operator {
            "=" | "==" => self.push(QueryNode::Equal {
                field: field.clone(),
                value,
            }),
            "!=" => {
                let equal = self.push(QueryNode::Equal {
                    field: field.clone(),
                    value,
                })?;
                self.push(QueryNode::Not(equal))
            }
            "<" => self.push(range(Bound::Unbounded, Bound::Excluded(value))),
            "<=" => self.push(range(Bound::Unbounded, Bound::Included(value))),
            ">" => self.push(range(Bound::Excluded(value), Bound::Unbounded)),
            _ => self.push(range(Bound::Included(value), Bound::Unbounded)),
        }
    }

    fn value(&mut self) -> Result<FieldValue, QueryError> {
        self.skip_space();
        let text = self.text;
        let rest = &text[self.position..];
        if rest.starts_with('"') {
            return self.string().map(FieldValue::Str);
        }
        if let Some(stamp) = rest.strip_prefix('@') {
            let end = stamp
                .find(|c: char| c.is_whitespace() || matches!(c, ')' | ','))
                .unwrap_or(stamp.len());
            let token = &stamp[..end];
            let ms = parse_timestamp(token)
                .ok_or_else(|| self.error(&format!("`@{token}` is not a timestamp")))?;
            self.position += 1 + end;
            return Ok(FieldValue::Timestamp(ms));
        }
        for (word, value) in [
            ("true", FieldValue::Bool(true)),
            ("false", FieldValue::Bool(false)),
        ] {
            if self.word(word) {
                return Ok(value);
            }
        }
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | ','))
            .unwrap_or(rest.len());
        let token = &rest[..end];
        let value = if let Ok(number) = token.parse::<i64>() {
            FieldValue::I64(number)
        } else {
            let float = match token.to_ascii_lowercase().as_str() {
                "inf" | "+inf" => Some(f64::INFINITY),
                "-inf" => Some(f64::NEG_INFINITY),
                _ if token
                    .starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '+' | '.')) =>
                {
                    token.parse::<f64>().ok()
                }
                _ => None,
            };
            match float.and_then(F64::new) {
                Some(number) => FieldValue::F64(number),
                None => {
                    return Err(self.error(
                        "expected a value: a \"string\", a number, true, false or @timestamp",
                    ))
                }
            }
        };
        self.position += end;
        Ok(value)
    }

    fn string(&mut self) -> Result<String, QueryError> {
        let start = self.position;
        let mut text = String::new();
        let mut characters = self.rest().char_indices().skip(1);
        while let Some((offset, character)) = characters.next() {
            match character {
                '"' => {
                    self.position = start + offset + 1;
                    check_string(&text)?;
                    return Ok(text);
                }
                '\\' => match characters.next() {
                    Some((_, '"')) => text.push('"'),
                    Some((_, '\\')) => text.push('\\'),
                    Some((_, 'n')) => text.push('\n'),
                    Some((_, 't')) => text.push('\t'),
                    _ => {
                        self.position = start + offset;
                        return Err(self.error("unknown escape (\\\" \\\\ \\n \\t)"));
                    }
                },
                other => text.push(other),
            }
        }
        Err(self.error("unterminated string"))
    }
}

fn is_field_character(character: char) -> bool {
    character.is_ascii_alphanumeric() || matches!(character, '_' | '.' | '-')
}

/// Milliseconds since the epoch from `1700000000000` or `2026-12-01[T10:30[:15[.250]]][Z]`
/// (UTC).
pub fn parse_timestamp(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, time) = text.split_once('T').unwrap_or((text, ""));
    let mut date_parts = date.split('-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: i64 = date_parts.next()?.parse().ok()?;
    let day: i64 = date_parts.next()?.parse().ok()?;
    if date_parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (mut hour, mut minute, mut second, mut milli) = (0, 0, 0, 0);
    if !time.is_empty() {
        let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
        let mut clock_parts = clock.split(':');
        hour = clock_parts.next()?.parse().ok()?;
        minute = clock_parts.next()?.parse().ok()?;
        second = clock_parts.next().map_or(Some(0), |s| s.parse().ok())?;
        if clock_parts.next().is_some() || hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        if !fraction.is_empty() {
            if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            milli =
                fraction.parse::<i64>().ok()? * 10_i64.pow(3 - u32::try_from(fraction.len()).ok()?);
        }
    }
    let days = days_from_civil(year, month, day);
    Some((((days * 24 + hour) * 60 + minute) * 60 + second) * 1000 + milli)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(pairs: &'a [(&str, FieldValue)]) -> impl Fn(&str) -> Option<&'a FieldValue> {
        move |name| {
            pairs
                .iter()
                .find(|(field, _)| *field == name)
                .map(|(_, value)| value)
        }
    }

    #[test]
    fn the_example_of_the_issue_parses_and_matches() {
        let query = parse_query(r#"age >= 20 and age < 30 and city = "Oslo""#).unwrap();
        assert_eq!(query.nodes.len(), 4);
        let ada = [
            ("age", FieldValue::I64(25)),
            ("city", FieldValue::Str("Oslo".into())),
        ];
        let bob = [
            ("age", FieldValue::I64(30)),
            ("city", FieldValue::Str("Oslo".into())),
        ];
        let eve = [("age", FieldValue::I64(25))];
        assert!(query.matches(fields(&ada)));
        assert!(!query.matches(fields(&bob)), "30 is excluded");
        assert!(!query.matches(fields(&eve)), "no city");
    }

    #[test]
    fn operators_bind_and_before_or_and_not_tightest() {
        let query = parse_query("a = 1 or b = 2 and not c = 3").unwrap();
        // or(a = 1, and(b = 2, not(c = 3)))
        assert!(matches!(query.nodes.last(), Some(QueryNode::Or(operands)) if operands.len() == 2));
        let only_b = [("b", FieldValue::I64(2))];
        assert!(query.matches(fields(&only_b)));
        let b_and_c = [("b", FieldValue::I64(2)), ("c", FieldValue::I64(3))];
        assert!(!query.matches(fields(&b_and_c)));
        let grouped = parse_query("(a = 1 or b = 2) and not (c = 3)").unwrap();
        assert!(!grouped.matches(fields(&b_and_c)));
    }

    #[test]
    fn every_comparison_form_parses() {
        let samples = [
            (r#"city in ("Oslo", "Bergen")"#, true),
            (r#"city prefix "Os""#, true),
            ("age between 20 and 25", true),
            ("age != 25", false),
            ("score > 1.5", true),
            ("score >= 2.5e0", true),
            ("active = TRUE", true),
            ("seen > @2026-01-01T00:00:00Z", true),
            ("seen <= @1767225600001", true),
            ("name exists", false),
            ("age in (1, 2, 25.0)", true),
        ];
        let entry = [
            ("age", FieldValue::I64(25)),
            ("city", FieldValue::Str("Oslo".into())),
            ("score", FieldValue::F64(F64::new(2.5).unwrap())),
            ("active", FieldValue::Bool(true)),
            ("seen", FieldValue::Timestamp(1_767_225_600_001)),
        ];
        for (text, expected) in samples {
            let query = parse_query(text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(query.matches(fields(&entry)), expected, "{text}");
        }
    }

    #[test]
    fn types_that_do_not_compare_never_match() {
        let entry = [("age", FieldValue::I64(20))];
        assert!(!parse_query(r#"age = "20""#)
            .unwrap()
            .matches(fields(&entry)));
        assert!(parse_query(r#"not age = "20""#)
            .unwrap()
            .matches(fields(&entry)));
        assert!(!parse_query(r#"age prefix "2""#)
            .unwrap()
            .matches(fields(&entry)));
        assert!(!parse_query("age < true").unwrap().matches(fields(&entry)));
    }

    #[test]
    fn integers_and_floats_compare_exactly() {
        let big = FieldValue::I64(i64::MAX);
        let float = FieldValue::F64(F64::new(9_223_372_036_854_775_807.0).unwrap());
        // The float is 2^63, above every i64.
        assert_eq!(big.compare(&float), Some(Ordering::Less));
        let half = FieldValue::F64(F64::new(2.5).unwrap());
        assert_eq!(FieldValue::I64(2).compare(&half), Some(Ordering::Less));
        assert_eq!(FieldValue::I64(3).compare(&half), Some(Ordering::Greater));
        assert_eq!(
            FieldValue::I64(-3).compare(&FieldValue::F64(F64::new(-3.0).unwrap())),
            Some(Ordering::Equal)
        );
        assert_eq!(F64::new(-0.0), F64::new(0.0));
        assert_eq!(F64::new(f64::NAN), None);
    }

    #[test]
    fn syntax_errors_say_where() {
        for (text, position) in [
            ("age >", 5),
            ("age >= 20 and", 13),
            ("(age = 1", 8),
            ("age ~ 3", 4),
            (r#"name = "open"#, 7),
            ("age = 1 age = 2", 8),
            ("9lives = 1", 0),
        ] {
            match parse_query(text) {
                Err(QueryError::Syntax { position: at, .. }) => {
                    assert_eq!(at, position, "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn printed_queries_read_back_the_same() {
        for text in [
            r#"age >= 20 and age < 30 and city = "Oslo""#,
            r#"not (a = "x\"y" or b in (1, 2.5, true, @0)) and c prefix "p""#,
            "age between -5 and 5 or score exists",
            "x < -inf or x > inf",
        ] {
            let query = parse_query(text).unwrap();
            let printed = query.to_text();
            let again = parse_query(&printed).unwrap_or_else(|error| panic!("{printed}: {error}"));
            assert_eq!(again.to_text(), printed, "{text}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let wide = vec!["a = 1"; QUERY_NODES_MAX + 1].join(" or ");
        assert!(parse_query(&wide).is_err());
        let deep = format!("{}a = 1{}", "(".repeat(200), ")".repeat(200));
        assert!(parse_query(&deep).is_err());
        let long = format!(r#"a = "{}""#, "x".repeat(FIELD_STRING_SIZE_MAX + 1));
        assert!(matches!(
            parse_query(&long),
            Err(QueryError::StringSize { .. })
        ));
        let bad = Query {
            nodes: vec![QueryNode::Not(0)],
        };
        assert!(matches!(check_query(&bad), Err(QueryError::Operand { .. })));
        assert!(!bad.matches(|_| None));
    }

    #[test]
    fn timestamps_parse_as_utc() {
        assert_eq!(parse_timestamp("1970-01-01"), Some(0));
        assert_eq!(
            parse_timestamp("2026-12-01T00:00:00Z"),
            Some(1_796_083_200_000)
        );
        assert_eq!(
            parse_timestamp("2000-02-29T12:30:15.250"),
            Some(951_827_415_250)
        );
        assert_eq!(parse_timestamp("2026-13-01"), None);
        assert_eq!(parse_timestamp("12"), Some(12));
    }
}
