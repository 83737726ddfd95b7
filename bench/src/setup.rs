//! Setup and teardown around a measured window, shared by the coordination workloads
//! (`lease_load`, `lock_load`): how many calls are in flight at once, and how failures of a
//! teardown are counted. Nothing here runs inside a window.

use std::future::Future;

use futures_util::stream::{self, StreamExt};

/// Calls in flight at once while setting up and tearing down (grants, batch openings, session
/// openings, revocations and closings).
pub const SETUP_CONCURRENCY: usize = 64;

/// Runs `calls` on `runtime`, `SETUP_CONCURRENCY` at a time, to the end; returns how many
/// failed, and the first failure's reason.
pub fn count_failures<F: Future<Output = Result<(), String>>>(
    runtime: &tokio::runtime::Runtime,
    calls: impl Iterator<Item = F>,
) -> (usize, Option<String>) {
    runtime.block_on(async {
        let mut calls = stream::iter(calls).buffer_unordered(SETUP_CONCURRENCY);
        let mut failed_count = 0;
        let mut first_failure = None;
        while let Some(outcome) = calls.next().await {
            if let Err(error) = outcome {
                failed_count += 1;
                first_failure.get_or_insert(error);
            }
        }
        (failed_count, first_failure)
    })
}
