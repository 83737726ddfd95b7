//! `tessera index` and `tessera query`, and the text forms they share with `put --field` and
//! `get`: a field value as the command line writes it ([`parse_field_value`],
//! [`field_value_text`]), a field as JSON ([`fields_json`]), and the cursor token that
//! continues a query ([`cursor_token`], [`parse_cursor_token`]).
//!
//! **Invariant:** what this module prints reads back as what was printed:
//! `parse_field_value(field_value_text(v)) == v`, and `parse_cursor_token(cursor_token(c))
//! == c` (the unit tests below).

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use serde_json::{json, Value};
use tessera_client::{
    BlockingClient, CorePlan, Field, FieldValue, IndexKind, IndexSpec, IndexState, IndexStatus,
    OrderBy, Projection, QueryAccess, QueryCursor, QueryItem, QueryOptions, QueryResult,
};
use tessera_protocol::limits::{QUERY_LIMIT_MAX, QUERY_ORDER_BY_MAX};
use tessera_protocol::query::{parse_query, parse_timestamp, QueryNode, F64};

use crate::{entry_json, print_json, Failure};

/// How `--field` values are typed; shown by `put --help`.
pub const FIELD_VALUE_HELP: &str = "\
Field values (--field NAME=VALUE, repeatable): 36 and -7 are i64; 2.5, 1e3, inf and -inf are \
f64; true and false are bool; @1767225600000 (ms since the epoch) and @2026-01-01, \
@2026-01-01T10:30:00Z or @2026-01-01T10:30:00.250 (UTC) are timestamps; \"36\" (quoted, with \
\\\" \\\\ \\n \\t escapes) is the string 36; anything else is a string as written (city=Oslo). \
A put replaces the key's fields: one without --field leaves it with none. At most 16 fields, \
each name once.";

/// The arguments of `tessera query`.
#[derive(Debug, clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each is a command-line flag; clap rejects the combinations that conflict"
)]
pub struct QueryArguments {
    /// The filter, e.g. 'age >= 20 and city = "Oslo"' (default: every entry under the
    /// prefix).
    pub filter: Option<String>,
    /// Only keys that start with this ("" for every key).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Print keys only.
    #[arg(long, conflicts_with = "fields")]
    pub keys_only: bool,
    /// Print keys and fields, without values.
    #[arg(long)]
    pub fields: bool,
    /// Most items to print.
    #[arg(
        long,
        default_value_t = tessera_client::QUERY_LIMIT_DEFAULT,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(QUERY_LIMIT_MAX))
    )]
    pub limit: u32,
    /// Order by this field (`field` or `field:asc` smallest first, `field:desc` largest
    /// first; entries without it last), then by key; repeatable, at most 4.
    #[arg(long, value_name = "FIELD[:desc]", value_parser = parse_order_by)]
    pub order_by: Vec<OrderBy>,
    /// Print only how many entries match.
    #[arg(long, conflicts_with_all = ["keys_only", "fields", "order_by", "after"])]
    pub count: bool,
    /// Also print each core's plan: the index it used (and what it looked up) or a scan,
    /// the entries it examined and matched, and the indexes still building.
    #[arg(long)]
    pub explain: bool,
    /// Continue after this cursor, as the previous page printed it (the same filter, prefix
    /// and order).
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<String>,
}

/// The `tessera index` commands.
#[derive(Debug, clap::Subcommand)]
pub enum IndexCommand {
    /// Define an index on every core: the keys starting with PREFIX, filed by their field
    /// FIELD.
    ///
    /// `eq` answers `=` and `in`; `range` also `<`, `<=`, `>`, `>=`, `between`, `exists` and
    /// string `prefix`. A query uses an index when its `--prefix` starts with the index's
    /// prefix and its whole filter requires a comparison of the field (the filter itself,
    /// or a part of a top-level `and`). Cores holding keys under the
    /// prefix build it in the background (`index list` shows the progress); queries use it
    /// where it is ready. The name defaults to PREFIX, FIELD, `_` and the kind
    /// (`index create user: age range` is `user:age_range`). Creating it again with the
    /// same definition changes nothing. Prints `created <name>` or `exists <name>`; with
    /// `-o json` `{"name", "created", "cores": [{"node_id", "core_id", "created"}]}`.
    Create {
        /// The keys it covers ("" for every key).
        prefix: String,
        /// The field it files them by.
        field: String,
        /// `eq` (equality) or `range`.
        #[arg(value_parser = parse_index_kind)]
        kind: IndexKind,
        /// The index's name (1..=64 bytes).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an index from every core: prints `dropped <name>`, or `not found` (exit 0).
    ///
    /// With `-o json`: `{"name", "dropped", "cores": [{"node_id", "core_id", "dropped"}]}`.
    Drop {
        /// The index.
        name: String,
    },
    /// List every index with its state on each core: ready, or building with the keys
    /// filed so far out of those it started with.
    ///
    /// Text: one line per index, `name prefix field kind entries memory state`, the state
    /// `ready` or each core's (`1:0=ready 1:1=building 120/400`, `missing` where a core
    /// lacks it). With `-o json`: `{"indexes": [{"name", "prefix", "field", "kind", "ready",
    /// "entries", "memory_bytes", "cores": [{"node_id", "core_id", "state", "keys_done",
    /// "keys_total", "entries", "memory_bytes"}], "missing": [{"node_id", "core_id"}]}]}`.
    List,
}

/// `tessera query --help`, after the flags.
pub const QUERY_AFTER_HELP: &str = r#"Filter syntax (docs/query.md):
  age >= 20 and age < 30 and city = "Oslo"
  city in ("Oslo", "Bergen") or name prefix "Ad"
  not (status = "archived") and seen > @2026-11-01
  age between 20 and 29, score exists, active = true, ...
Strings are double-quoted; numbers, true/false and @timestamps are bare.

Examples:
  tessera query 'city = "Oslo"' --prefix user:
  tessera query 'age >= 20' --prefix user: --order-by age:desc --limit 10
  tessera query 'age >= 20' --prefix user: --count
  tessera query 'age >= 20' --prefix user: --explain
  tessera query 'age >= 20' --prefix user: --after <cursor printed by the last page>

Output: one line per match, `<key><TAB><value>` followed by `<TAB>name=value ...` when the
entry has fields (--fields: `<key><TAB>name=value ...`; --keys-only: `<key>`). When more
matches follow, stderr says `more: continue with --after <cursor>`. --count prints the
number. --explain adds one line per core: `explain node N core C (revision R): index NAME
on FIELD, lookup ...` or `scan of the prefix`, then the entries examined and matched.

With -o json, one object: {"items": [{"key", "value", "create_revision", "mod_revision",
"version", "expires_at_ms", "fields"}], "count", "more", "cursor", "revisions"} (items of
--fields have "key" and "fields", of --keys-only "key"; "cursor" is null when nothing
follows); --count prints {"count", "revisions"}; --explain adds "plans": [{"node_id",
"core_id", "revision", "access" ("index" or "scan"), "index", "field", "lookup",
"examined", "matched", "sorted", "building"}]. Fields are {"name": {"type", "value"}} with
type string, i64, f64, bool or timestamp (ms since the epoch); an infinite f64 is "inf" or
"-inf".

Exit status: 0 on success, 2 on an error (a filter that does not parse says at which byte;
a core past its time budget answers budget_exceeded)."#;

fn parse_index_kind(text: &str) -> Result<IndexKind, String> {
    match text {
        "eq" => Ok(IndexKind::Equality),
        "range" => Ok(IndexKind::Range),
        other => Err(format!("{other:?} is not an index kind: eq or range")),
    }
}

/// `field`, `field:asc` or `field:desc`.
fn parse_order_by(text: &str) -> Result<OrderBy, String> {
    let (field, descending) = match text.rsplit_once(':') {
        Some((field, "desc")) => (field, true),
        Some((field, "asc")) => (field, false),
        Some((_, other)) => {
            return Err(format!(
                "{other:?} is not a direction: FIELD, FIELD:asc or FIELD:desc"
            ))
        }
        None => (text, false),
    };
    if field.is_empty() {
        return Err("the field name is empty".to_owned());
    }
    Ok(OrderBy {
        field: field.to_owned(),
        descending,
    })
}

/// Parses `--field NAME=VALUE` ([`FIELD_VALUE_HELP`] says how the value is typed).
pub fn parse_field(text: &str) -> Result<Field, String> {
    let Some((name, value)) = text.split_once('=') else {
        return Err(format!("{text:?} is not NAME=VALUE"));
    };
    if name.is_empty() {
        return Err(format!("{text:?} has no field name before `=`"));
    }
    Ok(Field::new(name, parse_field_value(value)?))
}

/// A field value as the command line writes it (see [`FIELD_VALUE_HELP`]).
pub fn parse_field_value(text: &str) -> Result<FieldValue, String> {
    if let Some(stamp) = text.strip_prefix('@') {
        return parse_timestamp(stamp)
            .map(FieldValue::Timestamp)
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a timestamp: @<ms since the epoch> or \
                 @YYYY-MM-DD[Thh:mm[:ss[.mmm]]][Z]"
                )
            });
    }
    if text.starts_with('"') {
        // The query syntax's strings, so both read quotes and escapes alike.
        let parsed = parse_query(&format!("x = {text}"));
        return match parsed.as_ref().map(|query| query.nodes.as_slice()) {
            Ok(
                [QueryNode::Equal {
                    value: value @ FieldValue::Str(_),
                    ..
                }],
            ) => Ok(value.clone()),
            _ => Err(format!(
                "{text:?} is not one quoted string (escapes: \\\" \\\\ \\n \\t)"
            )),
        };
    }
    match text {
        "true" => return Ok(FieldValue::Bool(true)),
        "false" => return Ok(FieldValue::Bool(false)),
        _ => {}
    }
    if let Ok(number) = text.parse::<i64>() {
        return Ok(FieldValue::I64(number));
    }
    // Rust reads more spellings of infinity (and NaN); only these two are numbers here.
    let is_infinity = matches!(text, "inf" | "-inf");
    let looks_numeric =
        is_infinity || text.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '.'));
    if looks_numeric {
        if let Some(number) = text
            .parse::<f64>()
            .ok()
            .filter(|number| number.is_finite() || is_infinity)
            .and_then(F64::new)
        {
            return Ok(FieldValue::F64(number));
        }
    }
    Ok(FieldValue::Str(text.to_owned()))
}

/// A field value as `--field` takes it and `get` prints it: strings bare when they read
/// back as themselves, quoted otherwise; timestamps as UTC dates where they have one.
pub fn field_value_text(value: &FieldValue) -> String {
    match value {
        FieldValue::Str(text) => {
            let is_plain = !text.is_empty()
                && !text.chars().any(|c| c.is_whitespace() || c.is_control())
                && parse_field_value(text).as_ref() == Ok(value);
            if is_plain {
                text.clone()
            } else {
                quoted(text)
            }
        }
        FieldValue::I64(number) => number.to_string(),
        FieldValue::F64(number) => {
            let number = number.get();
            if number.is_infinite() {
                if number > 0.0 { "inf" } else { "-inf" }.to_owned()
            } else {
                // `{:?}` always shows a point or an exponent, so it reads back as f64.
                format!("{number:?}")
            }
        }
        FieldValue::Bool(value) => value.to_string(),
        FieldValue::Timestamp(ms) => format!("@{}", timestamp_text(*ms)),
    }
}

fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

/// `2026-01-01T00:00:00.000Z` for a time in years 0 to 9999, else the milliseconds.
fn timestamp_text(ms: i64) -> String {
    const MS_PER_DAY: i64 = 86_400_000;
    let days = ms.div_euclid(MS_PER_DAY);
    let of_day = ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return ms.to_string();
    }
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm, the
/// inverse of the one `parse_timestamp` uses).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// An entry's fields as `get`, `scan` and `query` print them in JSON: `{"name": {"type",
/// "value"}}`, in name order.
pub fn fields_json(fields: &[Field]) -> Value {
    let object: serde_json::Map<String, Value> = fields
        .iter()
        .map(|field| {
            let value = match &field.value {
                FieldValue::Str(text) => Value::from(text.as_str()),
                FieldValue::I64(number) | FieldValue::Timestamp(number) => Value::from(*number),
                FieldValue::F64(number) if number.get().is_infinite() => {
                    Value::from(field_value_text(&field.value))
                }
                FieldValue::F64(number) => Value::from(number.get()),
                FieldValue::Bool(value) => Value::from(*value),
            };
            (
                field.name.clone(),
                json!({ "type": field.value.type_name(), "value": value }),
            )
        })
        .collect();
    Value::Object(object)
}

/// `name=value` for each field, space-separated, as `--field` takes them.
pub fn fields_text(fields: &[Field]) -> String {
    let mut text = String::new();
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            text.push(' ');
        }
        let _ = write!(text, "{}={}", field.name, field_value_text(&field.value));
    }
    text
}

/// The first byte of a cursor token: its format's version.
const CURSOR_TOKEN_VERSION: u8 = 1;

/// A cursor as one shell-safe word: hex of its version byte, the count of sort values,
/// each value (a tag byte, then a u32 little-endian length and the bytes of a string, or 8
/// little-endian bytes of a number, or one byte of a bool), then the key's bytes.
pub fn cursor_token(cursor: &QueryCursor) -> String {
    let mut bytes = vec![
        CURSOR_TOKEN_VERSION,
        u8::try_from(cursor.sort.len()).unwrap_or(u8::MAX),
    ];
    for value in &cursor.sort {
        match value {
            None => bytes.push(0),
            Some(FieldValue::Str(text)) => {
                bytes.push(1);
                let size = u32::try_from(text.len()).unwrap_or(u32::MAX);
                bytes.extend_from_slice(&size.to_le_bytes());
                bytes.extend_from_slice(text.as_bytes());
            }
            Some(FieldValue::I64(number)) => {
                bytes.push(2);
                bytes.extend_from_slice(&number.to_le_bytes());
            }
            Some(FieldValue::F64(number)) => {
                bytes.push(3);
                bytes.extend_from_slice(&number.get().to_bits().to_le_bytes());
            }
            Some(FieldValue::Bool(value)) => bytes.extend_from_slice(&[4, u8::from(*value)]),
            Some(FieldValue::Timestamp(ms)) => {
                bytes.push(5);
                bytes.extend_from_slice(&ms.to_le_bytes());
            }
        }
    }
    bytes.extend_from_slice(&cursor.key);
    let mut token = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(token, "{byte:02x}");
    }
    token
}

/// Reads a token [`cursor_token`] wrote.
pub fn parse_cursor_token(token: &str) -> Result<QueryCursor, String> {
    let invalid =
        |reason: &str| format!("--after {token:?} is not a cursor this tool printed ({reason})");
    if token.len() % 2 != 0 || !token.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(invalid("not an even number of hex digits"));
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .filter_map(|at| u8::from_str_radix(&token[at..at + 2], 16).ok())
        .collect();
    let mut reader = TokenReader { bytes: &bytes };
    if reader.take(1) != Some(&[CURSOR_TOKEN_VERSION][..]) {
        return Err(invalid("unknown version"));
    }
    let sort_count = reader.take(1).ok_or_else(|| invalid("truncated"))?[0];
    if usize::from(sort_count) > QUERY_ORDER_BY_MAX {
        return Err(invalid("too many sort values"));
    }
    let mut sort = Vec::with_capacity(usize::from(sort_count));
    for _ in 0..sort_count {
        let tag = reader.take(1).ok_or_else(|| invalid("truncated"))?[0];
        let value = match tag {
            0 => None,
            1 => {
                let size = reader.u64_of(4).ok_or_else(|| invalid("truncated"))?;
                let size = usize::try_from(size).map_err(|_| invalid("a string too long"))?;
                let text = reader.take(size).ok_or_else(|| invalid("truncated"))?;
                let text = std::str::from_utf8(text).map_err(|_| invalid("not UTF-8"))?;
                Some(FieldValue::Str(text.to_owned()))
            }
            2 | 5 => {
                let bits = reader.u64_of(8).ok_or_else(|| invalid("truncated"))?;
                let number = i64::from_le_bytes(bits.to_le_bytes());
                Some(if tag == 2 {
                    FieldValue::I64(number)
                } else {
                    FieldValue::Timestamp(number)
                })
            }
            3 => {
                let bits = reader.u64_of(8).ok_or_else(|| invalid("truncated"))?;
                let number = F64::new(f64::from_bits(bits))
                    .filter(|number| number.get().to_bits() == bits)
                    .ok_or_else(|| invalid("an f64 that is NaN or -0.0"))?;
                Some(FieldValue::F64(number))
            }
            4 => match reader.take(1).ok_or_else(|| invalid("truncated"))?[0] {
                0 => Some(FieldValue::Bool(false)),
                1 => Some(FieldValue::Bool(true)),
                _ => return Err(invalid("a bool that is neither 0 nor 1")),
            },
            _ => return Err(invalid("an unknown value tag")),
        };
        sort.push(value);
    }
    Ok(QueryCursor {
        sort,
        key: reader.bytes.to_vec(),
    })
}

/// Reads a token's bytes from the front.
struct TokenReader<'a> {
    bytes: &'a [u8],
}

impl<'a> TokenReader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < count {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Some(taken)
    }

    /// `size` (4 or 8) little-endian bytes as a number.
    fn u64_of(&mut self, size: usize) -> Option<u64> {
        let taken = self.take(size)?;
        let mut bytes = [0; 8];
        bytes[..size].copy_from_slice(taken);
        Some(u64::from_le_bytes(bytes))
    }
}

/// Runs an `index` command.
pub fn run_index(
    client: &BlockingClient,
    command: &IndexCommand,
    json: bool,
) -> Result<ExitCode, Failure> {
    match command {
        IndexCommand::Create {
            prefix,
            field,
            kind,
            name,
        } => {
            let name = name
                .clone()
                .unwrap_or_else(|| format!("{prefix}{field}_{}", kind.as_str()));
            let change = client.create_index(&IndexSpec::new(
                name.as_str(),
                prefix.as_str(),
                field,
                *kind,
            ))?;
            let created = change.is_applied_anywhere();
            if json {
                let cores: Vec<Value> = change
                    .cores
                    .iter()
                    .map(|core| {
                        json!({
                            "node_id": core.node_id,
                            "core_id": core.core_id,
                            "created": core.applied,
                        })
                    })
                    .collect();
                print_json(&json!({ "name": name, "created": created, "cores": cores }));
            } else if change.is_applied_everywhere() {
                println!("created {name}");
            } else if created {
                let count = change.cores.iter().filter(|core| core.applied).count();
                println!(
                    "created {name} on {count} of {} cores (the others had it)",
                    change.cores.len()
                );
            } else {
                println!("exists {name} (the same definition)");
            }
        }
        IndexCommand::Drop { name } => {
            let change = client.drop_index(name)?;
            let dropped = change.is_applied_anywhere();
            if json {
                let cores: Vec<Value> = change
                    .cores
                    .iter()
                    .map(|core| {
                        json!({
                            "node_id": core.node_id,
                            "core_id": core.core_id,
                            "dropped": core.applied,
                        })
                    })
                    .collect();
                print_json(&json!({ "name": name, "dropped": dropped, "cores": cores }));
            } else if dropped {
                println!("dropped {name}");
            } else {
                println!("not found");
            }
        }
        IndexCommand::List => print_indexes(&client.list_indexes()?, json),
    }
    Ok(ExitCode::SUCCESS)
}

fn index_json(status: &IndexStatus) -> Value {
    let cores: Vec<Value> = status
        .cores
        .iter()
        .map(|core| {
            let (state, keys_done, keys_total) = match core.state {
                IndexState::Ready => ("ready", None, None),
                IndexState::Building {
                    keys_done,
                    keys_total,
                } => ("building", Some(keys_done), Some(keys_total)),
            };
            json!({
                "node_id": core.node_id,
                "core_id": core.core_id,
                "state": state,
                "keys_done": keys_done,
                "keys_total": keys_total,
                "entries": core.entries,
                "memory_bytes": core.memory_bytes,
            })
        })
        .collect();
    let missing: Vec<Value> = status
        .missing
        .iter()
        .map(|(node_id, core_id)| json!({ "node_id": node_id, "core_id": core_id }))
        .collect();
    json!({
        "name": status.spec.name,
        "prefix": String::from_utf8_lossy(&status.spec.prefix),
        "field": status.spec.field,
        "kind": status.spec.kind.as_str(),
        "ready": status.is_ready(),
        "entries": status.entries,
        "memory_bytes": status.memory_bytes,
        "cores": cores,
        "missing": missing,
    })
}

/// `ready`, or every core's state.
fn index_state_text(status: &IndexStatus) -> String {
    if status.is_ready() {
        return "ready".to_owned();
    }
    let mut parts: Vec<String> = status
        .cores
        .iter()
        .map(|core| match core.state {
            IndexState::Ready => format!("{}:{}=ready", core.node_id, core.core_id),
            IndexState::Building {
                keys_done,
                keys_total,
            } => format!(
                "{}:{}=building {keys_done}/{keys_total}",
                core.node_id, core.core_id
            ),
        })
        .collect();
    parts.extend(
        status
            .missing
            .iter()
            .map(|(node_id, core_id)| format!("{node_id}:{core_id}=missing")),
    );
    parts.join(" ")
}

fn print_indexes(indexes: &[IndexStatus], json: bool) {
    if json {
        let list: Vec<Value> = indexes.iter().map(index_json).collect();
        print_json(&json!({ "indexes": list }));
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<24} {:<16} {:<16} {:<5} {:>10} {:>12} state",
        "name", "prefix", "field", "kind", "entries", "memory_bytes"
    );
    for status in indexes {
        let prefix = if status.spec.prefix.is_empty() {
            "\"\"".to_owned()
        } else {
            String::from_utf8_lossy(&status.spec.prefix).into_owned()
        };
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<16} {:<5} {:>10} {:>12} {}",
            status.spec.name,
            prefix,
            status.spec.field,
            status.spec.kind.as_str(),
            status.entries,
            status.memory_bytes,
            index_state_text(status)
        );
    }
}

/// Runs `tessera query`.
pub fn run_query(
    client: &BlockingClient,
    arguments: &QueryArguments,
    json: bool,
) -> Result<ExitCode, Failure> {
    // Checked before anything is sent, like a transaction document.
    let after = arguments
        .after
        .as_deref()
        .map(parse_cursor_token)
        .transpose()
        .map_err(Failure::Input)?;
    let mut options = QueryOptions::new()
        .prefix(&arguments.prefix)
        .limit(arguments.limit);
    if let Some(filter) = &arguments.filter {
        options = options.filter_text(filter)?;
    }
    for order in &arguments.order_by {
        options = if order.descending {
            options.order_by_descending(order.field.as_str())
        } else {
            options.order_by(order.field.as_str())
        };
    }
    if let Some(after) = after {
        options = options.after(after);
    }
    let projection = projection_of(arguments);
    options = options.projection(projection);
    if arguments.count {
        options = options.count_only();
    }
    let result = client.query(&options)?;
    if json {
        print_query_json(&result, arguments);
    } else {
        print_query_text(&result, arguments, projection);
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--keys-only` and `--fields` ask for (clap lets at most one through).
fn projection_of(arguments: &QueryArguments) -> Projection {
    if arguments.keys_only {
        Projection::KeysOnly
    } else if arguments.fields {
        Projection::Fields
    } else {
        Projection::Full
    }
}

fn item_json(item: &QueryItem, projection: Projection) -> Value {
    let key = Value::from(String::from_utf8_lossy(&item.key).as_ref());
    match (projection, &item.entry) {
        (Projection::Full, Some(entry)) => {
            let mut value = entry_json(entry);
            if let Some(object) = value.as_object_mut() {
                object.remove("found");
            }
            value["key"] = key;
            value["fields"] = fields_json(&entry.fields);
            value
        }
        (Projection::Fields, _) => json!({ "key": key, "fields": fields_json(&item.fields) }),
        _ => json!({ "key": key }),
    }
}

fn plan_json(plan: &CorePlan) -> Value {
    let (access, index, field, lookup) = match &plan.plan.access {
        QueryAccess::Index {
            name,
            field,
            lookup,
        } => (
            "index",
            Some(name.as_str()),
            Some(field.as_str()),
            Some(lookup.as_str()),
        ),
        QueryAccess::Scan => ("scan", None, None, None),
    };
    json!({
        "node_id": plan.node_id,
        "core_id": plan.core_id,
        "revision": plan.revision,
        "access": access,
        "index": index,
        "field": field,
        "lookup": lookup,
        "examined": plan.plan.examined,
        "matched": plan.plan.matched,
        "sorted": plan.plan.sorted,
        "building": plan.plan.building,
    })
}

fn print_query_json(result: &QueryResult, arguments: &QueryArguments) {
    let revisions: Vec<Value> = result
        .plans
        .iter()
        .map(|plan| {
            json!({
                "node_id": plan.node_id,
                "core_id": plan.core_id,
                "revision": plan.revision,
            })
        })
        .collect();
    let mut value = if arguments.count {
        json!({ "count": result.count, "revisions": revisions })
    } else {
        let projection = projection_of(arguments);
        let items: Vec<Value> = result
            .items
            .iter()
            .map(|item| item_json(item, projection))
            .collect();
        json!({
            "items": items,
            "count": result.count,
            "more": result.has_more(),
            "cursor": result.cursor.as_ref().map(cursor_token),
            "revisions": revisions,
        })
    };
    if arguments.explain {
        value["plans"] = result.plans.iter().map(plan_json).collect();
    }
    print_json(&value);
}

fn plan_text(plan: &CorePlan) -> String {
    let mut text = format!(
        "explain node {} core {} (revision {}): ",
        plan.node_id, plan.core_id, plan.revision
    );
    match &plan.plan.access {
        QueryAccess::Index {
            name,
            field,
            lookup,
        } => {
            let _ = write!(text, "index {name} on {field}, lookup {lookup}");
        }
        QueryAccess::Scan => text.push_str("scan of the prefix"),
    }
    let _ = write!(
        text,
        "; examined {}, matched {}",
        plan.plan.examined, plan.plan.matched
    );
    if plan.plan.sorted {
        text.push_str(", sorted");
    }
    if !plan.plan.building.is_empty() {
        let _ = write!(
            text,
            "; not used while building: {}",
            plan.plan.building.join(", ")
        );
    }
    text
}

fn print_query_text(result: &QueryResult, arguments: &QueryArguments, projection: Projection) {
    let mut out = std::io::stdout().lock();
    if arguments.count {
        let _ = writeln!(out, "{}", result.count);
    }
    for item in &result.items {
        let key = String::from_utf8_lossy(&item.key);
        let _ = match (projection, &item.entry) {
            (Projection::Full, Some(entry)) if entry.fields.is_empty() => {
                writeln!(out, "{key}\t{}", String::from_utf8_lossy(&entry.value))
            }
            (Projection::Full, Some(entry)) => writeln!(
                out,
                "{key}\t{}\t{}",
                String::from_utf8_lossy(&entry.value),
                fields_text(&entry.fields)
            ),
            (Projection::Fields, _) => writeln!(out, "{key}\t{}", fields_text(&item.fields)),
            _ => writeln!(out, "{key}"),
        };
    }
    if arguments.explain {
        for plan in &result.plans {
            let _ = writeln!(out, "{}", plan_text(plan));
        }
    }
    drop(out);
    if let Some(cursor) = &result.cursor {
        // On stderr, so the lines on stdout stay matches.
        eprintln!("more: continue with --after {}", cursor_token(cursor));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_are_typed_as_the_help_says() {
        let f64 = |value: f64| FieldValue::F64(F64::new(value).unwrap());
        for (text, expected) in [
            ("36", FieldValue::I64(36)),
            ("-7", FieldValue::I64(-7)),
            ("2.5", f64(2.5)),
            ("1e3", f64(1000.0)),
            ("inf", f64(f64::INFINITY)),
            ("true", FieldValue::Bool(true)),
            ("false", FieldValue::Bool(false)),
            ("@1767225600000", FieldValue::Timestamp(1_767_225_600_000)),
            ("@2026-01-01", FieldValue::Timestamp(1_767_225_600_000)),
            (r#""36""#, FieldValue::Str("36".to_owned())),
            (r#""a \"b\"""#, FieldValue::Str("a \"b\"".to_owned())),
            ("Oslo", FieldValue::Str("Oslo".to_owned())),
            ("", FieldValue::Str(String::new())),
            ("True", FieldValue::Str("True".to_owned())),
            ("nan", FieldValue::Str("nan".to_owned())),
            ("12abc", FieldValue::Str("12abc".to_owned())),
            ("-", FieldValue::Str("-".to_owned())),
        ] {
            assert_eq!(parse_field_value(text), Ok(expected), "{text}");
        }
        assert!(parse_field_value("@yesterday").is_err());
        assert!(parse_field_value(r#""open"#).is_err());
        assert!(parse_field_value(r#""a" or b = 1"#).is_err());
        assert_eq!(
            parse_field("city=Oslo=2"),
            Ok(Field::new("city", FieldValue::Str("Oslo=2".to_owned())))
        );
        assert!(parse_field("=1").is_err());
        assert!(parse_field("nothing").is_err());
    }

    #[test]
    fn printed_values_read_back() {
        for value in [
            FieldValue::Str("Oslo".to_owned()),
            FieldValue::Str("36".to_owned()),
            FieldValue::Str("true".to_owned()),
            FieldValue::Str("inf".to_owned()),
            FieldValue::Str("@noon".to_owned()),
            FieldValue::Str("\"quoted\"".to_owned()),
            FieldValue::Str("two words\tand\na \\".to_owned()),
            FieldValue::Str(String::new()),
            FieldValue::I64(i64::MIN),
            FieldValue::F64(F64::new(3.0).unwrap()),
            FieldValue::F64(F64::new(-1e300).unwrap()),
            FieldValue::F64(F64::new(f64::NEG_INFINITY).unwrap()),
            FieldValue::Bool(false),
            FieldValue::Timestamp(0),
            FieldValue::Timestamp(951_827_415_250),
            FieldValue::Timestamp(-1),
            FieldValue::Timestamp(i64::MAX),
            FieldValue::Timestamp(i64::MIN),
        ] {
            let text = field_value_text(&value);
            assert_eq!(parse_field_value(&text), Ok(value.clone()), "{text}");
        }
        assert_eq!(
            field_value_text(&FieldValue::Str("Oslo".to_owned())),
            "Oslo"
        );
        assert_eq!(
            field_value_text(&FieldValue::Str("36".to_owned())),
            "\"36\""
        );
        assert_eq!(
            field_value_text(&FieldValue::Timestamp(951_827_415_250)),
            "@2000-02-29T12:30:15.250Z"
        );
    }

    #[test]
    fn cursor_tokens_read_back() {
        let cursors = [
            QueryCursor {
                sort: Vec::new(),
                key: b"user:1".to_vec(),
            },
            QueryCursor {
                sort: vec![
                    None,
                    Some(FieldValue::Str("Oslo".to_owned())),
                    Some(FieldValue::I64(-3)),
                    Some(FieldValue::F64(F64::new(2.5).unwrap())),
                ],
                key: vec![0, 0xFF, b'k'],
            },
            QueryCursor {
                sort: vec![
                    Some(FieldValue::Bool(true)),
                    Some(FieldValue::Timestamp(1_767_225_600_000)),
                ],
                key: Vec::new(),
            },
        ];
        for cursor in cursors {
            let token = cursor_token(&cursor);
            assert!(
                token.bytes().all(|byte| byte.is_ascii_hexdigit()),
                "{token}"
            );
            assert_eq!(parse_cursor_token(&token), Ok(cursor));
        }
        for bad in [
            "",
            "0",
            "zz",
            "02",
            "0101",
            "010109",
            "0101030000000000f8ff",
            "01010402",
        ] {
            assert!(parse_cursor_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_by_reads_a_direction() {
        assert_eq!(
            parse_order_by("age:desc"),
            Ok(OrderBy {
                field: "age".to_owned(),
                descending: true
            })
        );
        assert!(!parse_order_by("age").unwrap().descending);
        assert!(!parse_order_by("age:asc").unwrap().descending);
        assert!(parse_order_by("age:up").is_err());
        assert!(parse_order_by(":desc").is_err());
    }
}
