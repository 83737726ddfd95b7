//! The time source. Shard logic never reads a clock: the core reads this once per batch of
//! requests and passes `now_ms` down.
//!
//! TTL deadlines are absolute Unix milliseconds, so they keep their meaning across restarts
//! (a key whose deadline passed while the server was down is gone). The cost is that a wall
//! clock stepped backwards lengthens TTLs and one stepped forwards shortens them, as in Redis.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the system clock is set before 1970.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Milliseconds on a monotonic clock since the process first asked; leases run on it, so a
/// wall clock step cannot end them early. Never goes back, and means nothing across restarts.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
