//! `tessera`: the command-line client.
//!
//! Human-readable output by default, `-o json` for scripts. Exit status: 0 on success, 1 when
//! `get` finds no key, 2 on any error (connection, server refusal, bad arguments).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tessera_client::{
    BlockingClient, ClientConfig, ClientError, Entry, KeyRange, PutOptions, ScanOptions,
    ShardRevision, TtlState,
};

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Command-line client for Tessera")]
struct Cli {
    /// Comma-separated `host:port` list used to fetch the topology.
    #[arg(
        long,
        global = true,
        env = "TESSERA_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000"
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t = Output::Text
    )]
    output: Output,
    /// Per-request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a key's value (exit 1 if it does not exist).
    Get { key: String },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Expire the key after this many milliseconds.
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// Only write if the key does not exist.
        #[arg(long, conflicts_with = "if_present")]
        if_absent: bool,
        /// Only write if the key exists.
        #[arg(long)]
        if_present: bool,
        /// Keep the key's current TTL.
        #[arg(long, conflicts_with = "ttl_ms")]
        keep_ttl: bool,
    },
    /// Remove a key.
    Del { key: String },
    /// Whether a key exists.
    Exists { key: String },
    /// A key's remaining time to live.
    Ttl { key: String },
    /// Set a key's time to live in milliseconds.
    Expire { key: String, ttl_ms: u64 },
    /// Remove a key's time to live.
    Persist { key: String },
    /// Add to a counter (a missing key counts as 0) and print its new value.
    Add {
        key: String,
        /// The amount to add; negative to subtract.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// List the keys that start with a prefix, in key order across every core (one per line,
    /// `key<TAB>value`; with `-o json` one object with an `items` array).
    Scan {
        /// The prefix ("" for every key).
        prefix: String,
        /// Most keys to print (default: all, read a page of 1000 at a time).
        #[arg(long)]
        limit: Option<u64>,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
        /// Print only how many keys match.
        #[arg(long, conflicts_with_all = ["limit", "keys_only"])]
        count: bool,
    },
    /// Ping every core of every node.
    Ping,
    /// Show nodes, cores, addresses and slot ranges.
    Topology,
    /// Show every core's counters (keys, revision, memory, requests).
    Stats,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            if cli.output == Output::Json {
                let code = error.code().map(tessera_client::ErrorCode::as_str);
                print_json(&json!({ "error": error.to_string(), "code": code }));
            }
            eprintln!("tessera: {error}");
            ExitCode::from(2)
        }
    }
}

/// Prints `value` as JSON, or `text` as a line.
fn answer(json: bool, value: &serde_json::Value, text: impl std::fmt::Display) {
    if json {
        print_json(value);
    } else {
        println!("{text}");
    }
}

fn run(cli: &Cli) -> Result<ExitCode, ClientError> {
    let mut config = ClientConfig::new(cli.endpoints.iter().cloned());
    config.request_timeout = Duration::from_millis(cli.timeout_ms);
    config.connect_timeout = Duration::from_millis(cli.timeout_ms);
    "tessera-cli".clone_into(&mut config.client_name);
    let client = BlockingClient::connect_with(config)?;
    let json = cli.output == Output::Json;
    match &cli.command {
        Command::Get { key } => return get(&client, key, json),
        Command::Put {
            key,
            value,
            ttl_ms,
            if_absent,
            if_present,
            keep_ttl,
        } => {
            let options = put_options(*ttl_ms, *if_absent, *if_present, *keep_ttl);
            let outcome = client.put_with(key, value, options)?;
            if json {
                print_json(&json!({
                    "applied": outcome.applied,
                    "mod_revision": outcome.mod_revision,
                }));
            } else if outcome.applied {
                println!("OK (mod_revision {})", outcome.mod_revision);
            } else {
                println!("not applied (condition failed)");
            }
        }
        Command::Del { key } => {
            let deleted = client.delete(key)?;
            answer(
                json,
                &json!({ "deleted": deleted }),
                if deleted { "deleted" } else { "not found" },
            );
        }
        Command::Exists { key } => {
            let exists = client.exists(key)?;
            answer(json, &json!({ "exists": exists }), exists);
        }
        Command::Ttl { key } => {
            let state = client.ttl(key)?;
            if json {
                print_json(&ttl_json(state));
            } else {
                match state {
                    TtlState::Missing => println!("not found"),
                    TtlState::Persistent => println!("no expiry"),
                    TtlState::Expiring { remaining_ms, .. } => println!("{remaining_ms} ms"),
                }
            }
        }
        Command::Expire { key, ttl_ms } => {
            let applied = client.expire(key, Duration::from_millis(*ttl_ms))?;
            answer(
                json,
                &json!({ "applied": applied }),
                if applied { "OK" } else { "not found" },
            );
        }
        Command::Persist { key } => {
            let applied = client.persist(key)?;
            if json {
                print_json(&json!({ "applied": applied }));
            } else {
                println!(
                    "{}",
                    if applied {
                        "OK"
                    } else {
                        "not found or no expiry"
                    }
                );
            }
        }
        Command::Add { key, delta } => {
            let value = client.add(key, *delta)?;
            answer(json, &json!({ "value": value }), value);
        }
        Command::Ping => print_pongs(&client.ping()?, json),
        Command::Topology => print_topology(&client.topology(), json),
        Command::Stats => print_stats(&client.stats()?, json),
        Command::Scan {
            prefix,
            limit,
            keys_only,
            count,
        } => scan(
            &client,
            KeyRange::prefix(prefix),
            *limit,
            *keys_only,
            *count,
            json,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a key's value; exit status 1 if it does not exist.
fn get(client: &BlockingClient, key: &str, json: bool) -> Result<ExitCode, ClientError> {
    let entry = client.get(key)?;
    if json {
        print_json(&entry.as_ref().map_or(json!({ "found": false }), entry_json));
    } else if let Some(entry) = &entry {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&entry.value);
        let _ = stdout.write_all(b"\n");
    } else {
        eprintln!("(not found)");
    }
    Ok(if entry.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Keys read per page when `scan` has no limit (or a larger one).
const SCAN_PAGE_KEYS: u64 = 1000;

/// Prints the keys of `range` a page at a time, so memory stays at one page however many
/// keys there are. JSON: `{"items": [...], "count": N, "revisions": [...]}`, where each
/// shard's revision is the one its last page was read at.
fn scan(
    client: &BlockingClient,
    mut range: KeyRange,
    limit: Option<u64>,
    keys_only: bool,
    count_only: bool,
    json: bool,
) -> Result<(), ClientError> {
    if count_only {
        let (count, revisions) = client.count(&range)?;
        let value = json!({ "count": count, "revisions": revisions_json(&revisions) });
        answer(json, &value, count);
        return Ok(());
    }
    let mut left = limit.unwrap_or(u64::MAX);
    let mut printed = 0_u64;
    let mut revisions: Vec<ShardRevision> = Vec::new();
    let mut out = std::io::stdout().lock();
    let mut opened = false;
    while left > 0 {
        let page_keys = u32::try_from(left.min(SCAN_PAGE_KEYS)).unwrap_or(1000);
        let mut options = ScanOptions::default().limit(page_keys);
        if keys_only {
            options = options.keys_only();
        }
        let page = client.scan(&range, options)?;
        if json && !opened {
            // Only once the first page is read: an error instead is printed as one object.
            let _ = write!(out, "{{\"items\":[");
            opened = true;
        }
        for item in &page.items {
            let key = String::from_utf8_lossy(&item.key);
            if json {
                let mut value = match &item.entry {
                    Some(entry) => entry_json(entry),
                    None => json!({}),
                };
                value["key"] = Value::from(key.as_ref());
                if let Some(object) = value.as_object_mut() {
                    object.remove("found");
                }
                let separator = if printed == 0 { "" } else { "," };
                let _ = write!(out, "{separator}{value}");
            } else if let Some(entry) = &item.entry {
                let _ = writeln!(out, "{key}\t{}", String::from_utf8_lossy(&entry.value));
            } else {
                let _ = writeln!(out, "{key}");
            }
            printed += 1;
        }
        left = left.saturating_sub(page.items.len() as u64);
        revisions = page.revisions;
        match page.continuation {
            Some(next) => range = next,
            None => break,
        }
    }
    if json {
        if !opened {
            let _ = write!(out, "{{\"items\":[");
        }
        let _ = writeln!(
            out,
            "],\"count\":{printed},\"revisions\":{}}}",
            revisions_json(&revisions)
        );
    }
    Ok(())
}

fn revisions_json(revisions: &[ShardRevision]) -> Value {
    revisions
        .iter()
        .map(|revision| {
            json!({
                "node_id": revision.node_id,
                "core_id": revision.core_id,
                "revision": revision.revision,
            })
        })
        .collect()
}

fn put_options(
    ttl_ms: Option<u64>,
    if_absent: bool,
    if_present: bool,
    keep_ttl: bool,
) -> PutOptions {
    let mut options = PutOptions::new();
    if let Some(ttl_ms) = ttl_ms {
        options = options.ttl(Duration::from_millis(ttl_ms));
    }
    if if_absent {
        options = options.if_absent();
    }
    if if_present {
        options = options.if_present();
    }
    if keep_ttl {
        options = options.keep_ttl();
    }
    options
}

fn print_stats(all_stats: &[tessera_client::CoreStats], json: bool) {
    if json {
        let list: Vec<Value> = all_stats
            .iter()
            .map(|stats| {
                json!({
                    "node_id": stats.node_id,
                    "core_id": stats.core_id,
                    "key_count": stats.key_count,
                    "revision": stats.revision,
                    "memory_bytes": stats.memory_bytes,
                    "memory_bytes_max": stats.memory_bytes_max,
                    "request_count": stats.request_count,
                    "expired_count": stats.expired_count,
                    "connection_count": stats.connection_count,
                    "log_record_count": stats.log_record_count,
                    "log_sync_count": stats.log_sync_count,
                    "log_byte_count": stats.log_byte_count,
                    "log_no_space_count": stats.log_no_space_count,
                    "log_room_bytes": stats.log_room_bytes,
                })
            })
            .collect();
        print_json(&Value::Array(list));
        return;
    }
    println!(
        "{:<6} {:<5} {:>10} {:>10} {:>14} {:>12} {:>10}",
        "node", "core", "keys", "revision", "memory_bytes", "requests", "expired"
    );
    for stats in all_stats {
        println!(
            "{:<6} {:<5} {:>10} {:>10} {:>14} {:>12} {:>10}",
            stats.node_id,
            stats.core_id,
            stats.key_count,
            stats.revision,
            stats.memory_bytes,
            stats.request_count,
            stats.expired_count
        );
    }
}

fn print_pongs(pongs: &[tessera_client::Pong], json: bool) {
    if json {
        let list: Vec<Value> = pongs
            .iter()
            .map(|pong| {
                json!({
                    "node_id": pong.node_id,
                    "core_id": pong.core_id,
                    "address": pong.address,
                    "round_trip_us": u64::try_from(pong.round_trip.as_micros()).unwrap_or(u64::MAX),
                })
            })
            .collect();
        print_json(&Value::Array(list));
    } else {
        for pong in pongs {
            println!(
                "PONG node {} core {} {} {} us",
                pong.node_id,
                pong.core_id,
                pong.address,
                pong.round_trip.as_micros()
            );
        }
    }
}

fn print_topology(topology: &tessera_client::Topology, json: bool) {
    if json {
        let nodes: Vec<Value> = topology
            .nodes
            .iter()
            .map(|node| {
                let cores: Vec<Value> = node
                    .cores
                    .iter()
                    .map(|core| {
                        json!({
                            "core_id": core.core_id,
                            "address": core.address,
                            "slot_start": core.slots.start,
                            "slot_end": core.slots.end,
                        })
                    })
                    .collect();
                json!({ "node_id": node.node_id, "name": node.name, "cores": cores })
            })
            .collect();
        print_json(&json!({ "epoch": topology.epoch, "nodes": nodes }));
    } else {
        println!("epoch {}", topology.epoch);
        println!(
            "{:<6} {:<16} {:<5} {:<24} slots",
            "node", "name", "core", "address"
        );
        for node in &topology.nodes {
            for core in &node.cores {
                println!(
                    "{:<6} {:<16} {:<5} {:<24} {}..{} ({} slots)",
                    node.node_id,
                    node.name,
                    core.core_id,
                    core.address,
                    core.slots.start,
                    core.slots.end,
                    core.slots.len()
                );
            }
        }
    }
}

fn entry_json(entry: &Entry) -> Value {
    json!({
        "found": true,
        "value": String::from_utf8_lossy(&entry.value),
        "create_revision": entry.create_revision,
        "mod_revision": entry.mod_revision,
        "version": entry.version,
        "expires_at_ms": entry.expires_at_ms,
    })
}

fn ttl_json(state: TtlState) -> Value {
    match state {
        TtlState::Missing => json!({ "found": false }),
        TtlState::Persistent => json!({ "found": true, "expires": false }),
        TtlState::Expiring {
            remaining_ms,
            expires_at_ms,
        } => json!({
            "found": true,
            "expires": true,
            "remaining_ms": remaining_ms,
            "expires_at_ms": expires_at_ms,
        }),
    }
}

fn print_json(value: &Value) {
    println!("{value}");
}
