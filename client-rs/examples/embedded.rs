//! Embedded mode: Tessera's shards running inside this process, no server to start.
//!
//! ```text
//! cargo run -p tessera-client --features embedded --example embedded
//! ```

use std::time::Duration;

use tessera_client::{BlockingClient, Durability, EmbeddedConfig, PutOptions, TtlState};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // In memory for the demo; give it a `data_dir` and `Durability::Sync` to keep the data.
    let config = EmbeddedConfig {
        cores: 2,
        durability: Durability::Memory,
        ..EmbeddedConfig::default()
    };
    let client = BlockingClient::embedded(config)?;

    let topology = client.topology();
    for core in &topology.nodes[0].cores {
        println!("core {} owns slots {}", core.core_id, core.slots);
    }

    let written = client.put("greeting", "hello from an embedded shard")?;
    client.put("greeting", "hello again")?;
    let entry = client.get("greeting")?.ok_or("greeting vanished")?;
    println!(
        "greeting = {:?} (created at revision {}, first written at {}, last at {}, version {})",
        String::from_utf8_lossy(&entry.value),
        entry.create_revision,
        written.mod_revision,
        entry.mod_revision,
        entry.version
    );

    client.put_with(
        "session",
        "short-lived",
        PutOptions::new().ttl(Duration::from_millis(200)),
    )?;
    if let TtlState::Expiring { remaining_ms, .. } = client.ttl("session")? {
        println!("session expires in {remaining_ms} ms");
    }
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "session after 300 ms: {:?}",
        client.get("session")?.map(|entry| entry.value)
    );

    let keys: Vec<String> = (0..10).map(|index| format!("user:{index}")).collect();
    let entries: Vec<(&str, &str)> = keys.iter().map(|key| (key.as_str(), "x")).collect();
    client.mput(&entries)?;
    for stats in client.stats()? {
        println!("core {} holds {} keys", stats.core_id, stats.key_count);
    }
    client.shutdown();
    Ok(())
}
