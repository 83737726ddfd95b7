//! Named limits of the wire protocol, shared by client and server.
//!
//! Every size a peer can send is bounded here, and the constants are related to each other by
//! compile-time assertions so that a change to one cannot silently make another unreachable.
//! A frame whose header announces a body over [`FRAME_BODY_SIZE_MAX`] is rejected before any
//! buffer of that size is allocated.

/// Largest key, in bytes. Keys are also hashed for routing, so they are kept small.
pub const KEY_SIZE_MAX: usize = 4 * 1024;

/// Largest value, in bytes.
pub const VALUE_SIZE_MAX: usize = 1024 * 1024;

/// Most keys (or entries) in one `MultiGet`, `MultiPut` or `MultiDelete`.
pub const BATCH_COUNT_MAX: usize = 1024;

/// Most keys one shard returns in one scan page.
pub const SCAN_LIMIT_MAX: u32 = 10_000;

/// Bytes of keys and values after which a shard ends a scan page (it holds at least one
/// key), leaving room in the frame for the page's last item and the archive's structure.
pub const SCAN_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Bytes of events (keys, values, previous values and 64 per event for structure) after which
/// the server ends one `WatchEvents` frame; a frame holds at least one event. A revision with
/// more continues in the next frame.
pub const WATCH_FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Shortest progress interval a watch may ask for, in milliseconds.
pub const WATCH_PROGRESS_INTERVAL_MS_MIN: u32 = 10;

/// Longest progress interval a watch may ask for, in milliseconds (one hour).
pub const WATCH_PROGRESS_INTERVAL_MS_MAX: u32 = 60 * 60 * 1000;

/// Most compares in one transaction.
pub const TXN_COMPARES_MAX: usize = 128;

/// Most ops in one branch of a transaction.
pub const TXN_OPS_MAX: usize = 128;

/// Bytes of keys and values one transaction's reply may carry (entries read, previous
/// entries, range pages together). A range stops early at what is left (`more` set); a
/// transaction whose gets or previous entries alone pass it is refused `TooLarge` before
/// anything applies.
pub const TXN_READ_BYTES_MAX: usize = SCAN_PAGE_BYTES_MAX;

/// Most keys the range ops of one transaction return together.
pub const TXN_RANGE_ITEMS_MAX: usize = SCAN_LIMIT_MAX as usize;

/// Longest a lock request may wait in line, in milliseconds (one hour).
pub const LOCK_WAIT_MS_MAX: u32 = 60 * 60 * 1000;

/// Largest frame body (the archived message, without header or padding), in bytes.
///
/// A batch is bounded by both [`BATCH_COUNT_MAX`] and this size; a reply that would exceed it
/// is answered with `TooLarge` instead.
pub const FRAME_BODY_SIZE_MAX: usize = 8 * 1024 * 1024;

/// Size of the fixed frame header, in bytes.
pub const FRAME_HEADER_SIZE: usize = 32;

/// Frames (header and body) are padded to a multiple of this, so every body starts aligned.
pub const FRAME_ALIGNMENT: usize = 16;

/// Largest whole frame: header plus the largest body rounded up to [`FRAME_ALIGNMENT`].
pub const FRAME_SIZE_MAX: usize = FRAME_HEADER_SIZE + FRAME_BODY_SIZE_MAX;

/// Bytes of archive structure an envelope may add around one key and value (enum tags,
/// relative pointers, lengths, options). Measured at well under 128; kept generous.
pub const ENVELOPE_OVERHEAD_MAX: usize = 512;

/// Longest TTL a request may ask for: 100 years. Deadlines are `now + ttl`, so this also keeps
/// every deadline far from `u64::MAX`.
pub const TTL_MS_MAX: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Longest string the server or client puts in names and error messages, in bytes.
pub const TEXT_SIZE_MAX: usize = 1024;

/// Longest name of an indexed field, in bytes.
pub const FIELD_NAME_SIZE_MAX: usize = 64;

/// Longest string value of an indexed field (or string in a query), in bytes.
pub const FIELD_STRING_SIZE_MAX: usize = 1024;

/// Most nodes (comparisons and operators) in one query.
pub const QUERY_NODES_MAX: usize = 64;

/// Most values one `in` of a query lists.
pub const QUERY_IN_VALUES_MAX: usize = 256;

/// Longest query text `parse_query` reads, in bytes.
pub const QUERY_TEXT_SIZE_MAX: usize = 16 * 1024;

/// Most indexed fields one entry carries.
pub const FIELDS_PER_VALUE_MAX: usize = 16;

/// Longest index name, in bytes.
pub const INDEX_NAME_SIZE_MAX: usize = 64;

/// Most indexes one shard keeps.
pub const INDEXES_MAX: usize = 64;

/// Most indexes whose prefixes cover one key: each is updated by every write of the key.
pub const INDEXES_PER_PREFIX_MAX: usize = 8;

/// Most items of one query page per core.
pub const QUERY_LIMIT_MAX: u32 = SCAN_LIMIT_MAX;

/// Most `order_by` fields of a query.
pub const QUERY_ORDER_BY_MAX: usize = 4;

/// Most nodes in one topology.
pub const NODE_COUNT_MAX: usize = 1024;

/// Most cores (shards) on one node.
pub const CORE_COUNT_MAX: usize = 1024;

const _: () = assert!(FRAME_HEADER_SIZE % FRAME_ALIGNMENT == 0);
const _: () = assert!(FRAME_BODY_SIZE_MAX % FRAME_ALIGNMENT == 0);
const _: () = assert!(FRAME_ALIGNMENT.is_power_of_two());
// One maximal put (and its reply carrying the previous value) fits in one frame.
const _: () =
    assert!(KEY_SIZE_MAX + 2 * VALUE_SIZE_MAX + ENVELOPE_OVERHEAD_MAX <= FRAME_BODY_SIZE_MAX);
// A batch of maximal keys fits in one frame, so a MultiGet is never rejected for its keys alone.
const _: () =
    assert!(BATCH_COUNT_MAX * (KEY_SIZE_MAX + ENVELOPE_OVERHEAD_MAX) <= FRAME_BODY_SIZE_MAX);
// A full page, plus its last item (a maximal key and value) and the structure of every item,
// fits in one frame.
const _: () = assert!(
    SCAN_PAGE_BYTES_MAX
        + KEY_SIZE_MAX
        + VALUE_SIZE_MAX
        + SCAN_LIMIT_MAX as usize * 64
        + ENVELOPE_OVERHEAD_MAX
        <= FRAME_BODY_SIZE_MAX
);
// A full events frame plus one more maximal event (a key, its value and the previous value)
// fits in one frame; an event's archive is smaller than the 64 bytes of structure it is
// charged, so the charge bounds the frame.
const _: () = assert!(
    WATCH_FRAME_BYTES_MAX + KEY_SIZE_MAX + 2 * VALUE_SIZE_MAX + 64 + ENVELOPE_OVERHEAD_MAX
        <= FRAME_BODY_SIZE_MAX
);
// A transaction's reply at its read bounds, with the structure of every op and range item,
// fits in one frame.
const _: () = assert!(
    TXN_READ_BYTES_MAX
        + TXN_RANGE_ITEMS_MAX * 64
        + TXN_OPS_MAX * ENVELOPE_OVERHEAD_MAX
        + ENVELOPE_OVERHEAD_MAX
        <= FRAME_BODY_SIZE_MAX
);
// Body sizes travel as u32.
const _: () = assert!(FRAME_BODY_SIZE_MAX <= u32::MAX as usize);
// Query operands are numbered with u16.
const _: () = assert!(QUERY_NODES_MAX <= u16::MAX as usize);
// A node's cores are numbered with u16.
const _: () = assert!(CORE_COUNT_MAX <= u16::MAX as usize);
const _: () = assert!(TTL_MS_MAX < u64::MAX / 2);
// A key's size travels and is stored as u16 (the store's entry header).
const _: () = assert!(KEY_SIZE_MAX <= u16::MAX as usize);
