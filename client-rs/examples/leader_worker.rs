//! A background worker that must run on one machine at a time: several copies start, one
//! leads and works, the others wait in line; stop the leader (Ctrl-C, kill, or a pause past
//! its lease) and the next one takes over within the lease's TTL.
//!
//! ```text
//! cargo run -p tessera-client --example leader_worker -- 127.0.0.1:7000 worker-a
//! cargo run -p tessera-client --example leader_worker -- 127.0.0.1:7000 worker-b
//! cargo run -p tessera-client --features embedded --example leader_worker   # a demo in one process
//! ```
//!
//! The leader writes its progress with `put_fenced` under the election's hash tag, so a
//! former leader that was paused and wakes up cannot overwrite the new leader's work.

use std::time::Duration;

use tessera_client::{Client, LeaderChange, Result};

const TTL: Duration = Duration::from_secs(2);

/// Campaigns, then works as the leader for `rounds` rounds (or until the lease is lost),
/// then resigns.
async fn work(client: &Client, name: &str, rounds: u32) -> Result<()> {
    let election = client.election("jobs");
    let lease = client.lease(TTL).await?;
    println!("{name}: campaigning");
    let leadership = election.campaign(lease.id(), name).await?;
    println!("{name}: leading with token {}", leadership.token);
    for round in 0..rounds {
        if !lease.is_alive() {
            println!("{name}: lost the lease; no longer leading");
            return Ok(());
        }
        let progress = format!("{name} round {round}");
        let written = client
            .put_fenced("{jobs}progress", &progress, "{jobs}lock", leadership.token)
            .await?;
        if !written {
            println!("{name}: fenced off; another leader took over");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    election.resign(&leadership).await?;
    println!("{name}: resigned");
    Ok(())
}

async fn run() -> Result<()> {
    let mut arguments = std::env::args().skip(1);
    if let (Some(endpoint), Some(name)) = (arguments.next(), arguments.next()) {
        let client = Client::connect([endpoint]).await?;
        return work(&client, &name, u32::MAX).await;
    }
    demo().await
}

/// Three workers and an observer in one process, on embedded shards.
#[cfg(feature = "embedded")]
async fn demo() -> Result<()> {
    let config = tessera_client::EmbeddedConfig {
        cores: 2,
        durability: tessera_client::Durability::Memory,
        ..tessera_client::EmbeddedConfig::default()
    };
    let client = Client::embedded(config)?;
    let observer = client.clone();
    let watching = tokio::spawn(async move {
        let mut changes = 0;
        observer
            .election("jobs")
            .observe(|change| {
                match change {
                    LeaderChange::Elected(value) => {
                        println!("observer: {} leads", String::from_utf8_lossy(&value));
                    }
                    LeaderChange::Vacant => println!("observer: nobody leads"),
                }
                changes += 1;
                changes < 7
            })
            .await
    });
    let workers: Vec<_> = ["worker-a", "worker-b", "worker-c"]
        .into_iter()
        .map(|name| {
            let client = client.clone();
            tokio::spawn(async move { work(&client, name, 3).await })
        })
        .collect();
    for worker in workers {
        if let Ok(outcome) = worker.await {
            outcome?;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), watching).await;
    client.shutdown();
    Ok(())
}

#[cfg(not(feature = "embedded"))]
async fn demo() -> Result<()> {
    Err(tessera_client::ClientError::Topology(
        "give a server endpoint and a worker name, or build with --features embedded".to_owned(),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    run().await
}
