//! Errors: [`ErrorCode`], which travels on the wire in error responses, and [`ProtocolError`],
//! the reasons bytes cannot be turned into a frame or a message.
//!
//! "Not found" is not an error anywhere in this protocol: a missing key is a normal answer.

/// What went wrong, as the server tells the client. Clients branch on this, never on message
/// text. See [`ErrorCode::is_retryable`] for which codes guarantee nothing was applied.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
#[non_exhaustive]
pub enum ErrorCode {
    /// The key's slot is owned by another node; the reply says which and under what epoch.
    /// Nothing was applied.
    WrongShard,
    /// A key, value, batch, frame or reply is over its limit. Nothing was applied.
    TooLarge,
    /// The frame or its body could not be decoded; the connection is closed after this reply.
    BadFrame,
    /// The peer speaks a protocol version this server does not; the connection is closed.
    UnsupportedVersion,
    /// The server is shutting down and did not apply the request.
    ShuttingDown,
    /// A queue or connection limit was hit; nothing was applied, try again later.
    Overloaded,
    /// A request is well-formed but its arguments are not allowed (an empty key, a zero TTL).
    InvalidArgument,
    /// The shard's memory budget is used up; the write was not applied. Reads still work.
    StoreFull,
    /// A bug or an unexpected condition in the server. The request may or may not have applied.
    Internal,
    /// A counter would leave its range (it would overflow `i64`), or the stored value is not a
    /// counter. Nothing was applied.
    OutOfRange,
    /// The disk holding the shard's log is full; the write was not applied. Reads still work,
    /// and writes are accepted again once space is freed.
    NoSpace,
    /// A transaction names keys that live on different shards; the message names two of
    /// them. Nothing was applied. Keys that share a hash tag (`{tag}`) share a shard.
    CrossShard,
    /// The lease named does not live (it expired, was revoked or never was). Nothing was
    /// applied.
    LeaseNotFound,
    /// A per-shard table is full (leases, keys attached to leases); nothing was applied.
    /// Retry once some have ended.
    TableFull,
    /// A query passed a bound of the core answering it: its time budget, or more matches
    /// to sort than the core keeps. Nothing was applied; narrow the query, or add an index.
    BudgetExceeded,
}

impl ErrorCode {
    /// Whether the request certainly had no effect and may be sent again unchanged (after a
    /// topology refresh for `WrongShard`, after a pause for `Overloaded`, `StoreFull` and
    /// `NoSpace`).
    #[must_use]
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::WrongShard
                | Self::ShuttingDown
                | Self::Overloaded
                | Self::StoreFull
                | Self::NoSpace
                | Self::TableFull
        )
    }

    /// A stable, lowercase name for logs and JSON output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongShard => "wrong_shard",
            Self::TooLarge => "too_large",
            Self::BadFrame => "bad_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::ShuttingDown => "shutting_down",
            Self::Overloaded => "overloaded",
            Self::InvalidArgument => "invalid_argument",
            Self::StoreFull => "store_full",
            Self::Internal => "internal",
            Self::OutOfRange => "out_of_range",
            Self::NoSpace => "no_space",
            Self::CrossShard => "cross_shard",
            Self::LeaseNotFound => "lease_not_found",
            Self::TableFull => "table_full",
            Self::BudgetExceeded => "budget_exceeded",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Why bytes could not be turned into a frame or a message, or a message into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The 32 header bytes are not a header (bad magic, checksum, kind, flags).
    #[error("bad frame header: {reason}")]
    BadHeader {
        /// The first rule the header breaks.
        reason: &'static str,
    },
    /// The header is intact but announces a version this crate does not speak.
    #[error("unsupported protocol version {version} (this side speaks {supported})")]
    UnsupportedVersion {
        /// Version the peer announced.
        version: u16,
        /// Version this side speaks.
        supported: u16,
    },
    /// The body is larger than the protocol allows.
    #[error("frame body of {body_size} bytes is over the limit of {body_size_max} bytes")]
    BodyTooLarge {
        /// Size announced or produced.
        body_size: usize,
        /// The limit.
        body_size_max: usize,
    },
    /// The body does not match the checksum in its header.
    #[error("frame body checksum mismatch (header {expected:#010x}, body {actual:#010x})")]
    BodyChecksum {
        /// Checksum carried in the header.
        expected: u32,
        /// Checksum of the bytes received.
        actual: u32,
    },
    /// The frame is of the wrong kind for where it arrived (a response sent to a server).
    #[error("unexpected frame kind {kind}")]
    UnexpectedKind {
        /// The kind byte received.
        kind: u8,
    },
    /// The body failed validation as an archived message.
    #[error("invalid message body: {reason}")]
    InvalidBody {
        /// What validation reported.
        reason: String,
    },
    /// A message could not be serialized.
    #[error("cannot encode message: {reason}")]
    Encode {
        /// What serialization reported.
        reason: String,
    },
}

impl ProtocolError {
    /// The wire code a server answers this error with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::BodyTooLarge { .. } => ErrorCode::TooLarge,
            Self::Encode { .. } => ErrorCode::Internal,
            Self::BadHeader { .. }
            | Self::BodyChecksum { .. }
            | Self::UnexpectedKind { .. }
            | Self::InvalidBody { .. } => ErrorCode::BadFrame,
        }
    }
}

/// Why a well-formed request is refused before it reaches a shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// A key is empty.
    #[error("key is empty")]
    EmptyKey,
    /// A key is over [`crate::limits::KEY_SIZE_MAX`].
    #[error("key of {size} bytes is over the limit of {size_max} bytes")]
    KeyTooLarge {
        /// Key length.
        size: usize,
        /// The limit.
        size_max: usize,
    },
    /// A value is over [`crate::limits::VALUE_SIZE_MAX`].
    #[error("value of {size} bytes is over the limit of {size_max} bytes")]
    ValueTooLarge {
        /// Value length.
        size: usize,
        /// The limit.
        size_max: usize,
    },
    /// A batch holds more than [`crate::limits::BATCH_COUNT_MAX`] items.
    #[error("batch of {count} items is over the limit of {count_max}")]
    BatchTooLarge {
        /// Items in the batch.
        count: usize,
        /// The limit.
        count_max: usize,
    },
    /// A TTL is zero or over [`crate::limits::TTL_MS_MAX`].
    #[error("ttl of {ttl_ms} ms is outside 1..={ttl_ms_max}")]
    TtlOutOfRange {
        /// TTL asked for.
        ttl_ms: u64,
        /// The limit.
        ttl_ms_max: u64,
    },
    /// A scan's limit is zero or over [`crate::limits::SCAN_LIMIT_MAX`].
    #[error("scan limit of {limit} is outside 1..={limit_max}")]
    ScanLimitOutOfRange {
        /// The limit asked for.
        limit: u32,
        /// The most allowed.
        limit_max: u32,
    },
    /// A watch's progress interval is outside the allowed range (0 turns it off).
    #[error("progress interval of {interval_ms} ms is outside {interval_ms_min}..={interval_ms_max} (0 for none)")]
    ProgressIntervalOutOfRange {
        /// The interval asked for.
        interval_ms: u32,
        /// The shortest allowed.
        interval_ms_min: u32,
        /// The longest allowed.
        interval_ms_max: u32,
    },
    /// A watch delivers neither puts nor deletes.
    #[error("a watch must deliver puts, deletes or both")]
    WatchesNothing,
    /// A range's end is not after its start.
    #[error("range end is not after its start")]
    EmptyRange,
    /// A transaction has more compares or ops than allowed.
    #[error("transaction has {count} {what}, over the limit of {count_max}")]
    TxnTooLarge {
        /// "compares" or "ops".
        what: &'static str,
        /// How many it has.
        count: usize,
        /// The limit.
        count_max: usize,
    },
    /// A transaction branch names a key in more than one op.
    #[error("transaction branch names key {key} in more than one op")]
    TxnDuplicateKey {
        /// The key, printable.
        key: String,
    },
    /// A counter's bounds are empty (`min > max`).
    #[error("counter bounds are empty: min {min} is over max {max}")]
    EmptyBounds {
        /// The lower bound.
        min: i64,
        /// The upper bound.
        max: i64,
    },
    /// A transaction names no key (only ranges), so it has no shard to run on.
    #[error("a transaction must name a key in a compare or an op: it runs on that key's shard")]
    TxnWithoutKey,
    /// A lock request's wait is over [`crate::limits::LOCK_WAIT_MS_MAX`].
    #[error("lock wait of {wait_ms} ms is over the limit of {wait_ms_max} ms")]
    LockWaitOutOfRange {
        /// The wait asked for.
        wait_ms: u32,
        /// The limit.
        wait_ms_max: u32,
    },
    /// A lease id is 0, which names no lease.
    #[error("lease id 0 names no lease")]
    ZeroLease,
    /// A request could not be archived to be checked.
    #[error("request cannot be encoded: {reason}")]
    Unencodable {
        /// What encoding reported.
        reason: String,
    },
    /// A counter add asks to refresh a TTL it does not give.
    #[error("refresh_ttl needs a ttl")]
    RefreshWithoutTtl,
    /// A name or other text field is over [`crate::limits::TEXT_SIZE_MAX`].
    #[error("text of {size} bytes is over the limit of {size_max} bytes")]
    TextTooLarge {
        /// Text length.
        size: usize,
        /// The limit.
        size_max: usize,
    },
    /// An entry carries more indexed fields than [`crate::limits::FIELDS_PER_VALUE_MAX`].
    #[error("{count} fields are over the limit of {count_max} per entry")]
    TooManyFields {
        /// Fields given.
        count: usize,
        /// The limit.
        count_max: usize,
    },
    /// A field's name or value breaks a rule (size, a name given twice, a NaN).
    #[error("field {name:?}: {reason}")]
    BadField {
        /// The field's name (cut to the name limit).
        name: String,
        /// The rule broken.
        reason: String,
    },
    /// An index definition breaks a rule (its name or field's size).
    #[error("index {name:?}: {reason}")]
    BadIndex {
        /// The index's name (cut to the name limit).
        name: String,
        /// The rule broken.
        reason: String,
    },
    /// A query's predicate breaks a rule of [`crate::query::check_query`].
    #[error("query: {0}")]
    BadQuery(#[from] crate::query::QueryError),
    /// A query's other arguments break a rule (limit, order, cursor).
    #[error("query: {reason}")]
    BadQueryRequest {
        /// The rule broken.
        reason: String,
    },
}

impl RequestError {
    /// The wire code a server answers this error with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::EmptyKey
            | Self::TtlOutOfRange { .. }
            | Self::ScanLimitOutOfRange { .. }
            | Self::ProgressIntervalOutOfRange { .. }
            | Self::WatchesNothing
            | Self::EmptyRange
            | Self::TxnDuplicateKey { .. }
            | Self::TxnWithoutKey
            | Self::ZeroLease
            | Self::LockWaitOutOfRange { .. }
            | Self::EmptyBounds { .. }
            | Self::RefreshWithoutTtl
            | Self::BadField { .. }
            | Self::BadIndex { .. }
            | Self::BadQuery(_)
            | Self::BadQueryRequest { .. } => ErrorCode::InvalidArgument,
            Self::KeyTooLarge { .. }
            | Self::ValueTooLarge { .. }
            | Self::BatchTooLarge { .. }
            | Self::TxnTooLarge { .. }
            | Self::Unencodable { .. }
            | Self::TextTooLarge { .. }
            | Self::TooManyFields { .. } => ErrorCode::TooLarge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_numbers() {
        let error = ProtocolError::BodyTooLarge {
            body_size: 10,
            body_size_max: 8,
        };
        assert_eq!(
            error.to_string(),
            "frame body of 10 bytes is over the limit of 8 bytes"
        );
        assert_eq!(error.code(), ErrorCode::TooLarge);
        let error = RequestError::TtlOutOfRange {
            ttl_ms: 0,
            ttl_ms_max: 5,
        };
        assert_eq!(error.to_string(), "ttl of 0 ms is outside 1..=5");
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn only_unapplied_errors_are_retryable() {
        assert!(ErrorCode::WrongShard.is_retryable());
        assert!(ErrorCode::Overloaded.is_retryable());
        assert!(!ErrorCode::Internal.is_retryable());
        assert!(!ErrorCode::BadFrame.is_retryable());
        assert_eq!(ErrorCode::StoreFull.to_string(), "store_full");
    }
}
