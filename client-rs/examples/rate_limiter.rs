//! A fixed-window rate limiter: at most `LIMIT` requests per user per window, one counter add
//! per request and no read. The first request of a window creates the counter with the
//! window's TTL; adds past the limit fail with `OutOfRange` and change nothing; when the
//! window expires the next request starts a new one.
//!
//! ```text
//! cargo run -p tessera-client --features embedded --example rate_limiter
//! cargo run -p tessera-client --example rate_limiter -- 127.0.0.1:7000   # a running server
//! ```

use std::time::{Duration, Instant};

use tessera_client::{AddOptions, BlockingClient, ErrorCode, Result};

const LIMIT: i64 = 5;
const WINDOW: Duration = Duration::from_millis(500);

/// Whether `user` may make one more request in the current window.
fn allow(client: &BlockingClient, user: &str) -> Result<bool> {
    let window = AddOptions::new().max(LIMIT).ttl(WINDOW);
    match client.add_with(format!("rate:{user}"), 1, window) {
        Ok(_) => Ok(true),
        Err(error) if error.code() == Some(ErrorCode::OutOfRange) => Ok(false),
        Err(error) => Err(error),
    }
}

fn connect() -> Result<BlockingClient> {
    if let Some(endpoint) = std::env::args().nth(1) {
        return BlockingClient::connect([endpoint]);
    }
    #[cfg(feature = "embedded")]
    {
        let config = tessera_client::EmbeddedConfig {
            cores: 2,
            durability: tessera_client::Durability::Memory,
            ..tessera_client::EmbeddedConfig::default()
        };
        BlockingClient::embedded(config)
    }
    #[cfg(not(feature = "embedded"))]
    {
        Err(tessera_client::ClientError::Topology(
            "give a server endpoint, or build with --features embedded".to_owned(),
        ))
    }
}

fn main() -> Result<()> {
    let client = connect()?;
    let started = Instant::now();
    let mut allowed = 0;
    let mut refused = 0;
    // Twelve requests in quick succession, a pause past the window, then three more.
    for request in 0..15 {
        if request == 12 {
            std::thread::sleep(WINDOW + Duration::from_millis(100));
        }
        let verdict = allow(&client, "ada")?;
        if verdict {
            allowed += 1;
        } else {
            refused += 1;
        }
        println!(
            "{:>5} ms  request {request:>2}: {}",
            started.elapsed().as_millis(),
            if verdict {
                "allowed"
            } else {
                "refused (limit reached)"
            }
        );
    }
    println!("{allowed} allowed, {refused} refused (limit {LIMIT} per {WINDOW:?})");
    client.shutdown();
    Ok(())
}
