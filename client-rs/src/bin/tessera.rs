//! `tessera`: the command-line client.
//!
//! Human-readable output by default, `-o json` for scripts. Exit status: 0 on success (a
//! conditional write whose condition failed succeeds too, and says so), 1 when `get` or
//! `counter get` finds no key, when a transaction ran its failure branch and when `lease
//! keepalive`, `lease revoke` or `lease ttl` finds a lease that does not live, 2 on any error
//! (connection, server refusal, bad arguments, a malformed transaction document), and
//! 128 + the signal's number when `watch`, `lease keepalive --every-ms` or the rolling `stats`
//! view is interrupted (130 for Ctrl-C).
//!
//! `txn` reads its transaction from stdin as JSON ([`TxnDocument`]): the document is parsed
//! and checked before the client connects, so a malformed one fails the same way whether or
//! not a server is reachable.
//!
//! `query` prints one page of matches (`--limit`, default 100) and, when more follow, the
//! cursor to continue from on stderr (`more: continue with --after <cursor>`), so stdout
//! holds only matches; `put --field` takes field values in the form `get` prints them
//! (`tessera/query.rs`).
//!
//! `watch` prints one line per event and flushes it at once, so a pipe sees each event when it
//! happens. When it stops, for whatever reason, it prints on stderr the positions to resume
//! from (`resume with: --from <node>:<core>:<revision>...`): what it printed in full, so a
//! resumed watch skips no event, and repeats some only of a revision `--count` cut short.
//!
//! `lease` commands run the async [`Client`] on a runtime of their own, because
//! [`BlockingClient`] does not wrap the lease calls (and keeps its runtime private). Nothing
//! renews a lease in the background here: that runtime only runs while a command does, so
//! `lease grant` grants a lease nothing renews, and `lease keepalive --every-ms` is the
//! renewing process.

// In a directory of its own: a file beside this one would be a binary of its own.
#[path = "tessera/query.rs"]
mod query;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_client::{
    AddOptions, BlockingClient, Client, ClientConfig, ClientError, Compare, CompareOp, CounterAdd,
    DeleteOptions, Entry, EventKind, KeyRange, PutOptions, Scan, ScanItem, ScanOptions,
    ShardRevision, Topology, TtlState, Txn, TxnOp, TxnOutcome, TxnResult, WatchEvent, WatchMessage,
    WatchOptions,
};
use tessera_protocol::limits::{FRAME_BODY_SIZE_MAX, LOCK_WAIT_MS_MAX, SCAN_LIMIT_MAX};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Command-line client for Tessera",
    after_help = "Exit status: 0 on success (also when a conditional write's condition \
                  failed; it says so), 1 when get or counter get finds no key, txn ran its \
                  failure branch or lease keepalive, revoke or ttl finds a lease that does \
                  not live, 2 on an error, 130 when watch, lease keepalive --every-ms or \
                  stats --interval-ms is interrupted by Ctrl-C."
)]
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

/// Arguments of `stats`.
#[derive(Debug, clap::Args)]
struct StatsArguments {
    /// Print a rolling line of totals every this many milliseconds (default 1000 when
    /// `--count` is given).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    interval_ms: Option<u64>,
    /// Stop the rolling view after this many lines.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Every node: whether it answers this client, the epoch it serves, and what the other
    /// nodes' failure detectors report of it. Exit 0 if every node is up, 1 otherwise.
    Status,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a key's value (exit 1 if it does not exist), then its fields, one
    /// `name=value` line each in the form `put --field` takes.
    ///
    /// With `-o json`: `{"found", "value", "create_revision", "mod_revision", "version",
    /// "expires_at_ms"}`, and `"fields": {"name": {"type", "value"}}` when the entry has
    /// fields.
    Get { key: String },
    /// Write a key.
    ///
    /// A conditional put whose condition fails writes nothing, prints `not applied
    /// (condition failed, current version N)` (`-o json`: `"applied": false` and the
    /// `version`) and exits 0.
    #[command(after_help = query::FIELD_VALUE_HELP)]
    Put(PutArguments),
    /// Remove a key.
    ///
    /// A conditional delete whose condition fails removes nothing, prints `not applied
    /// (condition failed, current version N)` (`-o json`: `"deleted": false` and the
    /// `version`) and exits 0; a missing key prints `not found`.
    Del(DelArguments),
    /// Whether a key exists.
    Exists { key: String },
    /// A key's remaining time to live.
    Ttl { key: String },
    /// Set a key's time to live in milliseconds.
    Expire { key: String, ttl_ms: u64 },
    /// Remove a key's time to live.
    Persist { key: String },
    /// Add to a counter (a missing key counts as 0) and print its new value (`counter add`
    /// takes bounds and a TTL window).
    Add {
        key: String,
        /// The amount to add; negative to subtract.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// Counters with bounds and TTL windows (add, get, set).
    ///
    /// A counter is a key holding the decimal text of an i64, changed atomically on its
    /// shard.
    #[command(subcommand)]
    Counter(CounterCommand),
    /// Run a transaction on one shard, read as JSON from stdin (exit 1 if its failure
    /// branch ran).
    ///
    /// If every compare holds, the `success` ops run, else the `failure` ops, in order, and
    /// all their writes take one revision. Exit 0 when the success branch ran, 1 when the
    /// failure branch ran, 2 on an error.
    #[command(after_help = TXN_AFTER_HELP)]
    Txn,
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
    /// Print the changes to the keys that start with a prefix, one line per event, until
    /// interrupted (or `--count`).
    ///
    /// Lines: `put <key> <value> rev=<node>:<core>:<revision> version=<n>`, `delete <key>
    /// rev=...`, `expire <key> rev=...`, `snapshot <key> <value> rev=...` and `progress
    /// rev=...`; with `-o json` one object per line, told apart by its `type`. On exit, stderr
    /// gets `resume with: --from ...`: the positions that resume right after the last line
    /// printed.
    #[command(after_help = WATCH_AFTER_HELP)]
    Watch(WatchArguments),
    /// Secondary indexes on the entries' fields: create, drop, list.
    #[command(subcommand)]
    Index(query::IndexCommand),
    /// Find the entries whose fields match a filter, on every core, in key order or by
    /// `--order-by`; `--limit` at a time, continued with `--after`.
    #[command(after_help = query::QUERY_AFTER_HELP)]
    Query(query::QueryArguments),
    /// Ping every core of every node.
    Ping,
    /// Show nodes, cores, addresses and slot ranges.
    Topology,
    /// The cluster: `tessera cluster status` lists every node with its state.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show every core's counters (keys, revision, memory, requests); with `--count` or
    /// `--interval-ms`, a rolling one-line view of the totals instead.
    ///
    /// The rolling view prints, every `--interval-ms`, one line with the totals across every
    /// core of every node: keys, memory used, requests/s, connections, expired keys/s,
    /// watchers, log syncs/s and log records per sync since the line before (rates are `-`
    /// on the first line). A header line comes first and again every 20 lines; `-o json`
    /// prints one object per line instead. It stops after `--count` lines, or on Ctrl-C
    /// (exit 130).
    Stats(StatsArguments),
    /// Leases: grant, keepalive, revoke, ttl, list.
    ///
    /// A lease is a TTL that ends unless renewed; keys put with `--lease <id>` are deleted
    /// when it ends (revoked, or not renewed in time). Nothing renews a granted lease but
    /// `lease keepalive`.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Take a lock: print its fencing token on the first line, then hold it until
    /// interrupted (Ctrl-C releases it and exits 130).
    ///
    /// The lock rides on a lease of `--ttl-ms` that this command renews while it runs; if the
    /// process stops (killed, or paused past the TTL) the lock passes to the next in line.
    /// Exit 1 if `--wait-ms` passed without the lock, or if the lease was lost while held.
    Lock {
        /// The lock's name (a hash tag puts it beside the keys it guards).
        name: String,
        /// Wait at most this long for the lock (default: until it is granted).
        #[arg(long)]
        wait_ms: Option<u64>,
        /// The TTL of the lease the lock rides on.
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
    },
}

/// The arguments of `tessera put`.
#[derive(Debug, clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each is a command-line flag; clap rejects the combinations that conflict"
)]
struct PutArguments {
    key: String,
    value: String,
    /// Expire the key after this many milliseconds.
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// Only write if the key does not exist.
    #[arg(long, conflicts_with_all = ["if_present", "if_version", "if_value"])]
    if_absent: bool,
    /// Only write if the key exists.
    #[arg(long, conflicts_with_all = ["if_version", "if_value"])]
    if_present: bool,
    /// Only write if the key's version is N (0: the key does not exist): a compare-and-set
    /// against a version read earlier.
    #[arg(long, value_name = "N", conflicts_with = "if_value")]
    if_version: Option<u64>,
    /// Only write if the key exists and holds exactly this value.
    #[arg(long, value_name = "VALUE")]
    if_value: Option<String>,
    /// Keep the key's current TTL.
    #[arg(long, conflicts_with = "ttl_ms")]
    keep_ttl: bool,
    /// Attach the key to this lease (`lease grant` prints its id): the key is deleted when
    /// the lease ends. Fails with `lease_not_found` if the lease does not live.
    #[arg(long, value_name = "ID", value_parser = parse_lease_id)]
    lease: Option<u64>,
    /// Give the entry an indexed field, typed by its value (see below); repeatable.
    #[arg(long = "field", value_name = "NAME=VALUE", value_parser = query::parse_field)]
    fields: Vec<tessera_client::Field>,
}

/// The arguments of `tessera del`.
#[derive(Debug, clap::Args)]
struct DelArguments {
    key: String,
    /// Only delete if the key's version is N.
    #[arg(long, value_name = "N", conflicts_with = "if_value")]
    if_version: Option<u64>,
    /// Only delete if the key holds exactly this value.
    #[arg(long, value_name = "VALUE")]
    if_value: Option<String>,
}

/// The `tessera counter` commands.
#[derive(Debug, Subcommand)]
enum CounterCommand {
    /// Add to a counter and print its new value.
    ///
    /// With `-o json`: `{"value", "applied", "mod_revision"}`. An add that would leave the
    /// bounds or overflow i64, or a key that is not a counter, fails with `out_of_range`
    /// (exit 2) and changes nothing.
    Add {
        key: String,
        /// The amount to add; negative to subtract.
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        /// The smallest value the counter may take.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        min: Option<i64>,
        /// The largest value the counter may take.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        max: Option<i64>,
        /// A counter this add creates expires after this many milliseconds (a fixed window:
        /// later adds keep the expiry).
        #[arg(long, value_name = "N")]
        ttl_ms: Option<u64>,
        /// Restart the TTL at --ttl-ms on every add (a sliding window).
        #[arg(long, requires = "ttl_ms")]
        refresh_ttl: bool,
        /// Do not create a missing counter: print `not applied (no counter)` instead (exit 0).
        #[arg(long)]
        no_create: bool,
    },
    /// Print a counter's value (exit 1 if it does not exist, 2 if it is not a counter).
    Get { key: String },
    /// Set a counter's value, keeping its TTL (its window).
    Set {
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: i64,
    },
}

/// The `tessera lease` commands.
#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Grant a lease of this many milliseconds and print its id.
    ///
    /// Nothing renews it: it ends after the TTL unless `lease keepalive` renews it. With `-o
    /// json`: `{"id", "ttl_ms"}`.
    Grant {
        /// The TTL in milliseconds.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        ttl_ms: u64,
    },
    /// Renew leases once, in one round, and print `<id> ttl=<ms>` or `<id> not found` for
    /// each (exit 1 if any was not found).
    ///
    /// With `--every-ms N`, renew every N milliseconds until interrupted (exit 130 on
    /// Ctrl-C), printing the first round and then a line only for a lease that changed:
    /// `<id> not found` once it ended (it is renewed no more; exit 1 once none is left). A
    /// round that fails is reported on stderr and tried again at the next one, until the
    /// leases' longest TTL has passed without a renewal (exit 2). With `-o json` a round
    /// prints one line, `{"leases": [{"id", "found", "ttl_ms"}, ...]}`, or `{"error",
    /// "code"}` if it failed.
    Keepalive {
        /// The leases to renew.
        #[arg(required = true, value_name = "ID", value_parser = parse_lease_id)]
        ids: Vec<u64>,
        /// Renew every this many milliseconds until interrupted; a third of the shortest
        /// TTL leaves room for two lost rounds.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        every_ms: Option<u64>,
    },
    /// End a lease now, deleting its keys: prints `revoked`, or `not found` (exit 1).
    ///
    /// With `-o json`: `{"revoked"}`.
    Revoke {
        #[arg(value_parser = parse_lease_id)]
        id: u64,
    },
    /// Print a lease's TTL and time left: `id=<id> ttl=<ms> remaining=<ms>` (exit 1 if it
    /// does not live).
    ///
    /// With `-o json`: `{"id", "found", "ttl_ms", "remaining_ms", "keys", "more"}`, `keys`
    /// only with `--keys`; `more` says a shard held more attached keys than it listed.
    Ttl {
        #[arg(value_parser = parse_lease_id)]
        id: u64,
        /// Also print the keys attached to it, one per line, in key order.
        #[arg(long)]
        keys: bool,
    },
    /// Print the ids of every live lease, one per line, ascending.
    ///
    /// With `-o json`: `{"ids": [...]}`.
    List,
}

/// Parses a lease id, as `lease grant` prints it: a decimal u64 other than 0, which names no
/// lease.
fn parse_lease_id(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("lease id 0 names no lease".to_owned()),
        Ok(id) => Ok(id),
        Err(error) => Err(format!(
            "{error}: a lease id is a decimal number, as `lease grant` prints it"
        )),
    }
}

const TXN_AFTER_HELP: &str = r#"The document (every section optional; unknown fields are refused):
  {
    "compare": [
      {"key": "k", "exists": true},          (false: the key does not exist)
      {"key": "k", "version": ["=", 3]},
      {"key": "k", "value": ["!=", "x"]},
      {"key": "k", "mod_revision": [">", 10]},
      {"key": "k", "create_revision": ["<=", 10]},
      {"key": "k", "lease": ["=", 0]},        (the key's lease; 0: none)
      {"key": "{job}lock", "fence": 42}        (42 >= the lock's last token)
    ],
    "success": [
      {"get": "k"},
      {"put": "k", "value": "v", "ttl_ms": 1000, "keep_ttl": false, "lease": 7},
      {"delete": "k"},
      {"add": "n", "delta": 1, "min": 0, "max": 10, "ttl_ms": 1000,
       "refresh_ttl": false, "no_create": false},
      {"range": "prefix", "limit": 100}
    ],
    "failure": []
  }
Operators: = != < <= > >=. A missing key has version, create_revision and mod_revision 0
and fails every value compare. Every key must live on one shard: give them one hash tag,
like {user42}name and {user42}email. A branch names a key at most once. A range lists only
the transaction shard's keys (limit: default and most 10000), after the earlier ops' writes.

Output: `succeeded revision=R` or `failed revision=R`, then one line per op of the branch
that ran: `get <key> <value>` (or `(none)`), `put <key> version=N`, `delete <key>
deleted|absent`, `add <key> <value>` (or `(not applied)`), `range <prefix> <count> keys`
followed by its `<key><TAB><value>` lines. With -o json: {"succeeded", "revision",
"results": [{"op": "get", "key", ...}, ...]}.

Exit status: 0 when the success branch ran, 1 when the failure branch ran, 2 on an error
(a malformed document, keys on different shards, a counter add out of range: nothing is
applied)."#;

/// The arguments of `tessera watch`.
#[derive(Debug, clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each is a command-line flag; clap rejects the combinations that conflict"
)]
struct WatchArguments {
    /// The prefix ("" for every key).
    prefix: String,
    /// Print each core's keys of the prefix first (`snapshot` lines), then the changes after.
    #[arg(long, conflicts_with = "from")]
    snapshot: bool,
    /// Resume right after these positions, one per core, as `resume with:` printed them
    /// (`node:core:revision`, space-separated or repeated).
    #[arg(
        long,
        num_args = 1..,
        value_name = "NODE:CORE:REVISION",
        value_parser = parse_position
    )]
    from: Vec<ShardRevision>,
    /// Print each key's previous value (`previous=` in text, `previous` in JSON).
    #[arg(long)]
    prev: bool,
    /// Print puts only.
    #[arg(long, conflicts_with = "deletes_only")]
    puts_only: bool,
    /// Print deletes and expiries only.
    #[arg(long)]
    deletes_only: bool,
    /// Have every core report its progress this often (`progress` lines).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    progress_ms: Option<u32>,
    /// Stop after this many snapshot and event lines (progress lines do not count).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Follow the result set of a query over the keys' fields (the syntax of `tessera
    /// query`): keys entering or changing in it print as `put`, keys leaving it as `left`
    /// (still there) or their delete; a snapshot holds only the keys that match.
    #[arg(long, value_name = "EXPR")]
    query: Option<String>,
}

const WATCH_AFTER_HELP: &str = "\
Examples:
  tessera watch user:                          changes from now on
  tessera watch user: --snapshot               the keys first, then the changes
  tessera watch user: --from 1:0:17 1:1:9      resume after these positions
  tessera -o json watch user: --count 10       ten events as NDJSON
  tessera watch user: --query 'age >= 20'      keys entering and leaving that result set

Positions are per core: <node>:<core>:<revision>, as the rev= of each line shows. A
resume needs one for every core; `resume with:` on stderr lists them all. A revision that
--count cut short is resumed from its start, so its first events print again.

Exit status: 0 after --count events, 130 on Ctrl-C (128 + the signal), 2 on an error,
such as a watch that lagged behind or asked for compacted history.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(Failure::Client(error)) => {
            // `watch` prints NDJSON, whose lines a reader tells apart by their type.
            let fields =
                matches!(cli.command, Command::Watch(_)).then(|| json!({ "type": "error" }));
            report_error(cli.output == Output::Json, &error, fields);
            ExitCode::from(2)
        }
        Err(Failure::Input(message) | Failure::Local(message)) => {
            if cli.output == Output::Json {
                print_json(&json!({ "error": message, "code": Value::Null }));
            }
            eprintln!("tessera: {message}");
            ExitCode::from(2)
        }
    }
}

/// Why a command failed; either way it exits 2.
enum Failure {
    /// The client, or the server through it, refused or failed.
    Client(ClientError),
    /// The command's input is malformed (a transaction document); nothing was sent.
    Input(String),
    /// This process cannot do the work (its runtime did not start); nothing was sent.
    Local(String),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Self::Client(error)
    }
}

/// Prints `error` on stderr and, for `-o json`, as an object on stdout. `fields` are added
/// to that object.
fn report_error(json: bool, error: &ClientError, fields: Option<Value>) {
    if json {
        let code = error.code().map(tessera_client::ErrorCode::as_str);
        let mut value = json!({ "error": error.to_string(), "code": code });
        if let (Some(Value::Object(fields)), Some(object)) = (fields, value.as_object_mut()) {
            object.extend(fields);
        }
        print_json(&value);
    }
    eprintln!("tessera: {error}");
}

/// Prints `value` as JSON, or `text` as a line.
fn answer(json: bool, value: &serde_json::Value, text: impl std::fmt::Display) {
    if json {
        print_json(value);
    } else {
        println!("{text}");
    }
}

/// The client settings the global options say.
fn client_config(cli: &Cli) -> ClientConfig {
    let mut config = ClientConfig::new(cli.endpoints.iter().cloned());
    config.request_timeout = Duration::from_millis(cli.timeout_ms);
    config.connect_timeout = Duration::from_millis(cli.timeout_ms);
    "tessera-cli".clone_into(&mut config.client_name);
    config
}

/// Connects as the global options say.
fn connect(cli: &Cli) -> Result<BlockingClient, ClientError> {
    BlockingClient::connect_with(client_config(cli))
}

fn run(cli: &Cli) -> Result<ExitCode, Failure> {
    let json = cli.output == Output::Json;
    if let Command::Txn = cli.command {
        // Read before connecting: a malformed document is the same error with or without a
        // server.
        let txn = read_txn_document(std::io::stdin().lock())?;
        return Ok(run_txn(&connect(cli)?, txn, json)?);
    }
    if let Command::Lease(command) = &cli.command {
        return run_lease(cli, command);
    }
    if let Command::Lock {
        name,
        wait_ms,
        ttl_ms,
    } = &cli.command
    {
        return run_lock(cli, name, *wait_ms, *ttl_ms);
    }
    let client = connect(cli)?;
    match &cli.command {
        Command::Get { key } => return Ok(get(&client, key, json)?),
        Command::Put(arguments) => put(&client, arguments, json)?,
        Command::Del(arguments) => delete(&client, arguments, json)?,
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
        Command::Counter(command) => return Ok(counter(&client, command, json)?),
        Command::Txn => unreachable!("`txn` is run above, before connecting"),
        Command::Lease(_) => unreachable!("`lease` is run above, with a client of its own"),
        Command::Lock { .. } => unreachable!("`lock` is run above, with a client of its own"),
        Command::Watch(arguments) => return Ok(watch(&client, arguments, json)?),
        Command::Index(command) => return query::run_index(&client, command, json),
        Command::Query(arguments) => return query::run_query(&client, arguments, json),
        Command::Ping => print_pongs(&client.ping()?, json),
        Command::Topology => print_topology(&client.topology(), json),
        Command::Cluster(ClusterCommand::Status) => {
            return Ok(print_cluster_status(&client.cluster_status()?, json));
        }
        Command::Stats(arguments)
            if arguments.interval_ms.is_some() || arguments.count.is_some() =>
        {
            return Ok(stats_rolling(&client, arguments, json)?);
        }
        Command::Stats(_) => print_stats(&client.stats()?, json),
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
        for field in &entry.fields {
            let _ = writeln!(
                stdout,
                "{}={}",
                field.name,
                query::field_value_text(&field.value)
            );
        }
    } else {
        eprintln!("(not found)");
    }
    Ok(if entry.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs a `counter` command.
fn counter(
    client: &BlockingClient,
    command: &CounterCommand,
    json: bool,
) -> Result<ExitCode, ClientError> {
    match command {
        CounterCommand::Add {
            key,
            delta,
            min,
            max,
            ttl_ms,
            refresh_ttl,
            no_create,
        } => {
            let mut options = AddOptions::new();
            if let Some(min) = min {
                options = options.min(*min);
            }
            if let Some(max) = max {
                options = options.max(*max);
            }
            if let Some(ttl_ms) = ttl_ms {
                options = options.ttl(Duration::from_millis(*ttl_ms));
            }
            if *refresh_ttl {
                options = options.refresh_ttl();
            }
            if *no_create {
                options = options.no_create();
            }
            let outcome = client.add_with(key, *delta, options)?;
            if json {
                print_json(&json!({
                    "value": outcome.value,
                    "applied": outcome.applied,
                    "mod_revision": outcome.mod_revision,
                }));
            } else if outcome.applied {
                println!("{}", outcome.value);
            } else {
                println!("not applied (no counter)");
            }
        }
        CounterCommand::Get { key } => {
            let value = client.counter(key)?;
            match (json, value) {
                (true, Some(value)) => print_json(&json!({ "found": true, "value": value })),
                (true, None) => print_json(&json!({ "found": false })),
                (false, Some(value)) => println!("{value}"),
                (false, None) => eprintln!("(not found)"),
            }
            if value.is_none() {
                return Ok(ExitCode::from(1));
            }
        }
        CounterCommand::Set { key, value } => {
            let outcome = client.set_counter(key, *value)?;
            print_put(json, outcome.applied, outcome.mod_revision, outcome.version);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Most bytes of a transaction document read from stdin: room for a transaction as large as
/// one frame carries, with JSON's quoting and escapes around it.
const TXN_DOCUMENT_BYTES_MAX: usize = 4 * FRAME_BODY_SIZE_MAX;

/// A transaction as `tessera txn` reads it from stdin. See `TXN_AFTER_HELP` for an example.
///
/// The items stay JSON values here and are read one by one ([`document_item`]), so an error
/// names the item, and so each must be an object: serde would also take a struct from an
/// array of its fields in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnDocument {
    /// [`CompareDocument`]s; all must hold for `success` to run.
    #[serde(default)]
    compare: Vec<Value>,
    /// [`OpDocument`]s.
    #[serde(default)]
    success: Vec<Value>,
    /// [`OpDocument`]s.
    #[serde(default)]
    failure: Vec<Value>,
}

/// One compare: the key and exactly one check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareDocument {
    key: String,
    /// `true`: the key exists; `false`: it does not.
    exists: Option<bool>,
    value: Option<(OperatorDocument, String)>,
    version: Option<(OperatorDocument, u64)>,
    create_revision: Option<(OperatorDocument, u64)>,
    mod_revision: Option<(OperatorDocument, u64)>,
    /// The key's lease (0: none).
    lease: Option<(OperatorDocument, u64)>,
    /// The key names a lock, and this token is at least its last one.
    fence: Option<u64>,
}

/// A compare's operator, as written in the document.
#[derive(Debug, Clone, Copy, Deserialize)]
enum OperatorDocument {
    #[serde(rename = "=")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
}

impl From<OperatorDocument> for CompareOp {
    fn from(operator: OperatorDocument) -> Self {
        match operator {
            OperatorDocument::Equal => Self::Equal,
            OperatorDocument::NotEqual => Self::NotEqual,
            OperatorDocument::Less => Self::Less,
            OperatorDocument::LessOrEqual => Self::LessOrEqual,
            OperatorDocument::Greater => Self::Greater,
            OperatorDocument::GreaterOrEqual => Self::GreaterOrEqual,
        }
    }
}

/// One op: exactly one of `get`, `put`, `delete`, `add` and `range` (naming its key, or the
/// prefix), and the fields that kind takes. Serde sees every field as optional; which ones a
/// kind takes is checked in [`OpDocument::to_op`], so its errors can name the op.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpDocument {
    get: Option<String>,
    put: Option<String>,
    delete: Option<String>,
    add: Option<String>,
    range: Option<String>,
    /// `put`: the new value.
    value: Option<String>,
    /// `put`, `add`: the TTL in milliseconds.
    ttl_ms: Option<u64>,
    /// `put`: keep the key's expiry.
    keep_ttl: Option<bool>,
    /// `add`: the amount to add.
    delta: Option<i64>,
    /// `add`: the bounds.
    min: Option<i64>,
    max: Option<i64>,
    /// `add`: restart the TTL on every add.
    refresh_ttl: Option<bool>,
    /// `add`: do not create a missing counter.
    no_create: Option<bool>,
    /// `range`: most keys to return.
    limit: Option<u32>,
    /// `put`: attach the key to this lease.
    lease: Option<u64>,
}

/// Reads a transaction document (at most [`TXN_DOCUMENT_BYTES_MAX`] bytes) and turns it into
/// a [`Txn`], or says what is wrong with it.
fn read_txn_document(mut input: impl Read) -> Result<ParsedTxn, Failure> {
    let invalid =
        |reason: String| Failure::Input(format!("invalid transaction on stdin: {reason}"));
    let mut bytes = Vec::new();
    let limit = u64::try_from(TXN_DOCUMENT_BYTES_MAX).unwrap_or(u64::MAX);
    input
        .by_ref()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| {
            Failure::Input(format!("cannot read the transaction on stdin: {error}"))
        })?;
    if bytes.len() > TXN_DOCUMENT_BYTES_MAX {
        return Err(invalid(format!(
            "the document is over the limit of {TXN_DOCUMENT_BYTES_MAX} bytes"
        )));
    }
    let document: Value =
        serde_json::from_slice(&bytes).map_err(|error| invalid(error.to_string()))?;
    if !document.is_object() {
        return Err(invalid(format!(
            "the document is {}, not an object",
            json_kind(&document)
        )));
    }
    let document: TxnDocument =
        serde_json::from_value(document).map_err(|error| invalid(error.to_string()))?;
    document.to_txn().map_err(invalid)
}

/// Item `index` of the document's `section`, which must be an object.
fn document_item<T: serde::de::DeserializeOwned>(
    section: &str,
    index: usize,
    item: &Value,
) -> Result<T, String> {
    if !item.is_object() {
        return Err(format!(
            "{section}[{index}]: is {}, not an object",
            json_kind(item)
        ));
    }
    T::deserialize(item).map_err(|error| format!("{section}[{index}]: {error}"))
}

/// What kind of JSON value `value` is, for a message.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A transaction and, for printing its results, what each op of each branch names.
struct ParsedTxn {
    txn: Txn,
    /// The key (or range prefix) of each `success` op, in order.
    success_names: Vec<String>,
    /// The same for `failure`.
    failure_names: Vec<String>,
}

impl TxnDocument {
    fn to_txn(&self) -> Result<ParsedTxn, String> {
        let compares = self
            .compare
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let compare: CompareDocument = document_item("compare", index, item)?;
                compare
                    .to_compare()
                    .map_err(|reason| format!("compare[{index}] (key {:?}): {reason}", compare.key))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let branch = |name: &str, ops: &[Value]| {
            ops.iter()
                .enumerate()
                .map(|(index, item)| {
                    let op: OpDocument = document_item(name, index, item)?;
                    op.to_op()
                        .map_err(|reason| format!("{name}[{index}]: {reason}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let (success, success_names): (Vec<TxnOp>, Vec<String>) =
            branch("success", &self.success)?.into_iter().unzip();
        let (failure, failure_names): (Vec<TxnOp>, Vec<String>) =
            branch("failure", &self.failure)?.into_iter().unzip();
        Ok(ParsedTxn {
            txn: Txn::new().when(compares).then(success).otherwise(failure),
            success_names,
            failure_names,
        })
    }
}

impl CompareDocument {
    fn to_compare(&self) -> Result<Compare, String> {
        let key = self.key.as_bytes();
        let mut checks = Vec::with_capacity(1);
        if let Some(exists) = self.exists {
            checks.push(if exists {
                Compare::exists(key)
            } else {
                Compare::absent(key)
            });
        }
        if let Some((operator, value)) = &self.value {
            checks.push(Compare::value(key, (*operator).into(), value.as_bytes()));
        }
        if let Some((operator, version)) = self.version {
            checks.push(Compare::version(key, operator.into(), version));
        }
        if let Some((operator, revision)) = self.create_revision {
            checks.push(Compare::create_revision(key, operator.into(), revision));
        }
        if let Some((operator, revision)) = self.mod_revision {
            checks.push(Compare::mod_revision(key, operator.into(), revision));
        }
        if let Some((operator, lease)) = self.lease {
            checks.push(Compare {
                key: key.to_vec(),
                check: tessera_protocol::Check::Lease(operator.into(), lease),
            });
        }
        if let Some(token) = self.fence {
            checks.push(Compare::fence(key, token));
        }
        let check_count = checks.len();
        match <[Compare; 1]>::try_from(checks) {
            Ok([compare]) => Ok(compare),
            Err(_) => Err(format!(
                "has {check_count} checks, not 1: give exactly one of exists, value, version, \
                 create_revision, mod_revision, lease, fence"
            )),
        }
    }
}

impl OpDocument {
    /// The op and the key (or prefix) it names.
    fn to_op(&self) -> Result<(TxnOp, String), String> {
        let kinds = [
            ("get", &self.get),
            ("put", &self.put),
            ("delete", &self.delete),
            ("add", &self.add),
            ("range", &self.range),
        ];
        let given: Vec<(&str, &String)> = kinds
            .iter()
            .filter_map(|(kind, name)| name.as_ref().map(|name| (*kind, name)))
            .collect();
        let [(kind, name)] = given[..] else {
            let kinds: Vec<&str> = given.iter().map(|(kind, _)| *kind).collect();
            return Err(format!(
                "an op is exactly one of get, put, delete, add, range (with its key), not \
                 [{}]",
                kinds.join(", ")
            ));
        };
        let fields = [
            ("value", self.value.is_some()),
            ("ttl_ms", self.ttl_ms.is_some()),
            ("keep_ttl", self.keep_ttl.is_some()),
            ("delta", self.delta.is_some()),
            ("min", self.min.is_some()),
            ("max", self.max.is_some()),
            ("refresh_ttl", self.refresh_ttl.is_some()),
            ("no_create", self.no_create.is_some()),
            ("limit", self.limit.is_some()),
            ("lease", self.lease.is_some()),
        ];
        let allowed: &[&str] = match kind {
            "put" => &["value", "ttl_ms", "keep_ttl", "lease"],
            "add" => &["delta", "min", "max", "ttl_ms", "refresh_ttl", "no_create"],
            "range" => &["limit"],
            _ => &[],
        };
        if let Some((field, _)) = fields
            .iter()
            .find(|(field, given)| *given && !allowed.contains(field))
        {
            let takes = if allowed.is_empty() {
                "no other field".to_owned()
            } else {
                allowed.join(", ")
            };
            return Err(format!(
                "{kind} {name:?}: a {kind} op has no field `{field}` (it takes {takes})"
            ));
        }
        let key = name.as_bytes();
        let op = match kind {
            "get" => TxnOp::get(key),
            "delete" => TxnOp::delete(key),
            "put" => {
                let value = self
                    .value
                    .as_ref()
                    .ok_or_else(|| format!("put {name:?}: needs a `value`"))?;
                let keep_ttl = self.keep_ttl.unwrap_or(false);
                if keep_ttl && self.ttl_ms.is_some() {
                    return Err(format!(
                        "put {name:?}: `ttl_ms` and `keep_ttl` exclude each other"
                    ));
                }
                TxnOp::Put {
                    key: key.to_vec(),
                    value: value.as_bytes().to_vec(),
                    ttl_ms: self.ttl_ms,
                    keep_ttl,
                    return_previous: false,
                    lease: self.lease,
                    fields: Vec::new(),
                }
            }
            "add" => {
                let delta = self
                    .delta
                    .ok_or_else(|| format!("add {name:?}: needs a `delta`"))?;
                let refresh_ttl = self.refresh_ttl.unwrap_or(false);
                if refresh_ttl && self.ttl_ms.is_none() {
                    return Err(format!("add {name:?}: `refresh_ttl` needs a `ttl_ms`"));
                }
                TxnOp::Add(CounterAdd {
                    min: self.min,
                    max: self.max,
                    create: !self.no_create.unwrap_or(false),
                    ttl_ms: self.ttl_ms,
                    refresh_ttl,
                    ..CounterAdd::new(key, delta)
                })
            }
            "range" => TxnOp::Range(Scan::prefix(key, self.limit.unwrap_or(SCAN_LIMIT_MAX))),
            _ => unreachable!("op kinds are the ones listed above: {kind}"),
        };
        Ok((op, name.clone()))
    }
}

/// Runs a transaction and prints its outcome; exit status 0 when the success branch ran, 1
/// when the failure branch ran.
fn run_txn(
    client: &BlockingClient,
    parsed: ParsedTxn,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let ParsedTxn {
        txn,
        success_names,
        failure_names,
    } = parsed;
    let ops_by_branch = (txn.success.clone(), txn.failure.clone());
    let outcome = client.txn(txn)?;
    let (ops, names) = if outcome.succeeded {
        (ops_by_branch.0, success_names)
    } else {
        (ops_by_branch.1, failure_names)
    };
    if ops.len() != outcome.results.len() {
        return Err(ClientError::UnexpectedReply(format!(
            "a transaction branch of {} ops answered {} results",
            ops.len(),
            outcome.results.len()
        )));
    }
    print_txn(json, &outcome, &names);
    Ok(if outcome.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Prints a transaction's outcome; `names` are the keys (or prefixes) of the ops that ran.
fn print_txn(json: bool, outcome: &TxnOutcome, names: &[String]) {
    let results = outcome.results.iter().zip(names);
    if json {
        let results: Vec<Value> = results
            .map(|(result, name)| txn_result_json(result, name))
            .collect();
        print_json(&json!({
            "succeeded": outcome.succeeded,
            "revision": outcome.revision,
            "results": results,
        }));
        return;
    }
    let mut out = std::io::stdout().lock();
    let branch = if outcome.succeeded {
        "succeeded"
    } else {
        "failed"
    };
    let _ = writeln!(out, "{branch} revision={}", outcome.revision);
    for (result, name) in results {
        let _ = match result {
            TxnResult::Get(Some(entry)) => {
                writeln!(out, "get {name} {}", String::from_utf8_lossy(&entry.value))
            }
            TxnResult::Get(None) => writeln!(out, "get {name} (none)"),
            TxnResult::Put { version, .. } => writeln!(out, "put {name} version={version}"),
            TxnResult::Delete { deleted, .. } => {
                let what = if *deleted { "deleted" } else { "absent" };
                writeln!(out, "delete {name} {what}")
            }
            TxnResult::Add {
                applied: true,
                value,
            } => writeln!(out, "add {name} {value}"),
            TxnResult::Add { applied: false, .. } => writeln!(out, "add {name} (not applied)"),
            TxnResult::Range(page) => {
                let _ = writeln!(out, "range {name} {} keys", page.items.len());
                for item in &page.items {
                    let value = item
                        .entry
                        .as_ref()
                        .map(|entry| String::from_utf8_lossy(&entry.value));
                    let _ = writeln!(
                        out,
                        "{}\t{}",
                        String::from_utf8_lossy(&item.key),
                        value.unwrap_or_default()
                    );
                }
                Ok(())
            }
        };
    }
}

/// One result of `txn -o json`, told apart by its `op`.
fn txn_result_json(result: &TxnResult, name: &str) -> Value {
    match result {
        TxnResult::Get(entry) => {
            let mut value = entry.as_ref().map_or(json!({ "found": false }), entry_json);
            value["op"] = Value::from("get");
            value["key"] = Value::from(name);
            value
        }
        TxnResult::Put { version, .. } => json!({ "op": "put", "key": name, "version": version }),
        TxnResult::Delete { deleted, .. } => {
            json!({ "op": "delete", "key": name, "deleted": deleted })
        }
        TxnResult::Add { applied, value } => {
            json!({ "op": "add", "key": name, "applied": applied, "value": value })
        }
        TxnResult::Range(page) => {
            let items: Vec<Value> = page.items.iter().map(scan_item_json).collect();
            json!({
                "op": "range",
                "prefix": name,
                "count": page.items.len(),
                "more": page.more,
                "items": items,
            })
        }
    }
}

/// A key of a range, with the fields of its entry as `scan -o json` prints them.
fn scan_item_json(item: &ScanItem) -> Value {
    let mut value = item.entry.as_ref().map_or_else(|| json!({}), entry_json);
    if let Some(object) = value.as_object_mut() {
        object.remove("found");
    }
    value["key"] = Value::from(String::from_utf8_lossy(&item.key).as_ref());
    value
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

/// How often `watch` checks for Ctrl-C while no event arrives: the longest it takes to stop.
const WATCH_INTERRUPT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Why `watch` stopped.
enum WatchEnd {
    /// `--count` lines were printed.
    Counted,
    /// A signal asked it to stop (its number).
    Interrupted(i32),
    /// The watch failed.
    Failed(ClientError),
    /// The watch ended without an error (the client's watch never does this).
    Ended,
    /// Stdout is closed or full.
    Output(std::io::Error),
}

/// Prints the changes to the keys of a prefix until `--count`, a signal or an error, then the
/// positions to resume from on stderr.
fn watch(
    client: &BlockingClient,
    arguments: &WatchArguments,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let mut options = WatchOptions::new();
    if arguments.snapshot {
        options = options.snapshot();
    }
    if !arguments.from.is_empty() {
        options = options.after(arguments.from.clone());
    }
    if arguments.prev {
        options = options.previous();
    }
    if arguments.puts_only {
        options = options.puts_only();
    }
    if arguments.deletes_only {
        options = options.deletes_only();
    }
    if let Some(progress_ms) = arguments.progress_ms {
        options = options.progress_every(Duration::from_millis(u64::from(progress_ms)));
    }
    if let Some(text) = &arguments.query {
        let query = tessera_protocol::query::parse_query(text)
            .map_err(|error| ClientError::InvalidRequest(error.into()))?;
        options = options.query(query);
    }
    let mut positions = ResumePositions::new(&client.topology(), &arguments.from);
    let mut watch = match client.watch(&KeyRange::prefix(&arguments.prefix), options) {
        Ok(watch) => watch,
        Err(error @ ClientError::MissingPosition { .. }) => {
            report_error(json, &error, Some(json!({ "type": "error" })));
            eprintln!(
                "tessera: --from needs a position for every core ({}), as `resume with:` \
                 prints them",
                positions.shard_names()
            );
            return Ok(ExitCode::from(2));
        }
        Err(error @ ClientError::Compacted { .. }) => {
            return Ok(finish_watch(json, WatchEnd::Failed(error), positions));
        }
        Err(error) => return Err(error),
    };
    interrupt::install();
    // The watch is open on every core: each one's start is a position to resume from (not
    // a snapshot's, until its lines are printed).
    if !arguments.snapshot {
        for position in watch.positions() {
            positions.advance(position);
        }
    }
    // Asked at once, so with --progress-ms a reader sees that every core is watching.
    watch.request_progress();
    let format = WatchFormat {
        json,
        previous: arguments.prev,
        progress: arguments.progress_ms.is_some(),
    };
    let count_max = arguments.count.unwrap_or(u64::MAX);
    let mut printed_count = 0_u64;
    let mut out = std::io::stdout().lock();
    let end = loop {
        if printed_count >= count_max {
            break WatchEnd::Counted;
        }
        if let Some(signal) = interrupt::received() {
            break WatchEnd::Interrupted(signal);
        }
        let message = match watch.next_timeout(WATCH_INTERRUPT_CHECK_INTERVAL) {
            Ok(Ok(message)) => message,
            Ok(Err(error)) => break WatchEnd::Failed(error),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break WatchEnd::Ended,
        };
        let line_count_max = count_max - printed_count;
        match format.print(&mut out, &message, line_count_max) {
            Ok(Printed::All(line_count)) => {
                printed_count += line_count;
                positions.advance(message.shard());
            }
            Ok(Printed::Part(line_count)) => {
                printed_count += line_count;
                positions.cut(&message);
            }
            Err(error) => break WatchEnd::Output(error),
        }
    };
    drop(out);
    drop(watch);
    Ok(finish_watch(json, end, positions))
}

/// Reports why the watch stopped and where to resume; returns the exit status.
fn finish_watch(json: bool, end: WatchEnd, mut positions: ResumePositions) -> ExitCode {
    let code = match end {
        WatchEnd::Counted => ExitCode::SUCCESS,
        WatchEnd::Interrupted(signal) => interrupted_exit_code(signal),
        WatchEnd::Failed(error) => {
            let note = if let ClientError::Compacted {
                node_id,
                core_id,
                oldest_available,
            } = error
            {
                // Resuming where it stopped would fail the same way.
                positions.replace(ShardRevision {
                    node_id,
                    core_id,
                    revision: oldest_available,
                });
                Some(format!(
                    "tessera: node {node_id} core {core_id} no longer keeps the events after \
                     the position given; watch again with --snapshot, or skip the lost events \
                     by resuming after revision {oldest_available}:"
                ))
            } else {
                None
            };
            // An NDJSON reader tells the error line by its type, and can resume from it.
            let mut fields = json!({ "type": "error" });
            if let Ok(resume) = positions.resume() {
                fields["positions"] = revisions_json(&resume);
            }
            report_error(json, &error, Some(fields));
            if let Some(note) = note {
                eprintln!("{note}");
            }
            ExitCode::from(2)
        }
        WatchEnd::Ended => {
            eprintln!("tessera: the watch ended");
            ExitCode::from(2)
        }
        WatchEnd::Output(error) => {
            eprintln!("tessera: cannot write to stdout: {error}");
            ExitCode::from(2)
        }
    };
    match positions.resume() {
        Ok(resume) => eprintln!("resume with: --from {}", format_positions(&resume)),
        Err((node_id, core_id)) => eprintln!(
            "tessera: cannot resume: nothing of node {node_id} core {core_id} was printed in \
             full yet; watch again without --from"
        ),
    }
    code
}

/// Where a resumed watch should start on each core it covers, in topology order: the last
/// revision whose lines were all printed (or that a core reported progress at).
#[derive(Debug)]
struct ResumePositions {
    /// `(node_id, core_id)` and its revision, `None` until known.
    shards: Vec<((u32, u16), Option<u64>)>,
}

impl ResumePositions {
    /// Every core of `topology` (a prefix watch covers them all), at the `--from` positions.
    fn new(topology: &Topology, from: &[ShardRevision]) -> Self {
        let given: HashMap<(u32, u16), u64> = from
            .iter()
            .map(|position| ((position.node_id, position.core_id), position.revision))
            .collect();
        let shards = topology
            .nodes
            .iter()
            .flat_map(|node| node.cores.iter().map(|core| (node.node_id, core.core_id)))
            .map(|shard| (shard, given.get(&shard).copied()))
            .collect();
        Self { shards }
    }

    fn slot(&mut self, node_id: u32, core_id: u16) -> &mut Option<u64> {
        let found = self
            .shards
            .iter()
            .position(|(shard, _)| *shard == (node_id, core_id));
        let index = found.unwrap_or_else(|| {
            // A core the topology at the start did not have.
            self.shards.push(((node_id, core_id), None));
            self.shards.len() - 1
        });
        &mut self.shards[index].1
    }

    /// Everything of `shard` up to its revision was printed.
    fn advance(&mut self, shard: ShardRevision) {
        let slot = self.slot(shard.node_id, shard.core_id);
        *slot = Some(slot.map_or(shard.revision, |revision| revision.max(shard.revision)));
    }

    /// Only part of `message` was printed. Its events are replayed whole from the revision
    /// before (events before them were all printed); a snapshot cannot be resumed, so the
    /// core keeps what it had (nothing, for a snapshot).
    fn cut(&mut self, message: &WatchMessage) {
        if let WatchMessage::Events { shard, .. } = message {
            assert!(
                shard.revision > 0,
                "an event has a revision: shard={shard:?}"
            );
            self.advance(ShardRevision {
                revision: shard.revision - 1,
                ..*shard
            });
        }
    }

    /// `position` in place of its core's, even if earlier.
    fn replace(&mut self, position: ShardRevision) {
        *self.slot(position.node_id, position.core_id) = Some(position.revision);
    }

    /// The position of every core, or the first core without one.
    fn resume(&self) -> Result<Vec<ShardRevision>, (u32, u16)> {
        self.shards
            .iter()
            .map(|&((node_id, core_id), revision)| {
                revision
                    .map(|revision| ShardRevision {
                        node_id,
                        core_id,
                        revision,
                    })
                    .ok_or((node_id, core_id))
            })
            .collect()
    }

    /// The cores, as `node:core` for a message.
    fn shard_names(&self) -> String {
        let names: Vec<String> = self
            .shards
            .iter()
            .map(|((node_id, core_id), _)| format!("{node_id}:{core_id}"))
            .collect();
        names.join(" ")
    }
}

/// Parses a `--from` position: `node:core:revision`, as `rev=` and `resume with:` print it.
fn parse_position(text: &str) -> Result<ShardRevision, String> {
    let invalid = |reason: &str| {
        // A prefix after `--from` is taken for one more position.
        let hint = if text.starts_with(|first: char| first.is_ascii_digit()) {
            ""
        } else {
            " (the prefix goes before --from)"
        };
        format!(
            "{reason}: a position is <node>:<core>:<revision>, as `resume with:` prints it \
             (e.g. 1:0:17){hint}"
        )
    };
    let parts: Vec<&str> = text.split(':').collect();
    let [node_id, core_id, revision] = parts[..] else {
        return Err(invalid(&format!("{} parts, not 3", parts.len())));
    };
    Ok(ShardRevision {
        node_id: node_id
            .parse()
            .map_err(|error| invalid(&format!("node {node_id:?}: {error}")))?,
        core_id: core_id
            .parse()
            .map_err(|error| invalid(&format!("core {core_id:?}: {error}")))?,
        revision: revision
            .parse()
            .map_err(|error| invalid(&format!("revision {revision:?}: {error}")))?,
    })
}

/// `node:core:revision`, the form `--from` reads.
fn format_position(position: ShardRevision) -> String {
    format!(
        "{}:{}:{}",
        position.node_id, position.core_id, position.revision
    )
}

fn format_positions(positions: &[ShardRevision]) -> String {
    let parts: Vec<String> = positions.iter().copied().map(format_position).collect();
    parts.join(" ")
}

/// How much of a message was printed.
enum Printed {
    /// All of it, in this many lines (of the count).
    All(u64),
    /// The first lines only, this many: the count ran out.
    Part(u64),
}

/// How `watch` prints its lines.
struct WatchFormat {
    json: bool,
    /// `--prev`: print each event's previous value.
    previous: bool,
    /// `--progress-ms`: print progress lines.
    progress: bool,
}

impl WatchFormat {
    /// Prints `message`, at most `line_count_max` lines of snapshot items and events, and
    /// flushes each line.
    fn print(
        &self,
        out: &mut impl Write,
        message: &WatchMessage,
        line_count_max: u64,
    ) -> std::io::Result<Printed> {
        let mut line_count = 0_u64;
        let lines: Vec<String> = match message {
            WatchMessage::Progress(shard) => {
                if self.progress {
                    Self::write_line(out, &self.progress_line(*shard))?;
                }
                return Ok(Printed::All(0));
            }
            WatchMessage::Snapshot { shard, items } => items
                .iter()
                .take(usize::try_from(line_count_max).unwrap_or(usize::MAX))
                .map(|item| self.snapshot_line(*shard, &item.key, item.entry.as_ref()))
                .collect(),
            WatchMessage::Events { shard, events } => events
                .iter()
                .take(usize::try_from(line_count_max).unwrap_or(usize::MAX))
                .map(|event| self.event_line(*shard, event))
                .collect(),
        };
        let total_count = match message {
            WatchMessage::Snapshot { items, .. } => items.len(),
            WatchMessage::Events { events, .. } => events.len(),
            WatchMessage::Progress(_) => 0,
        };
        let is_whole = lines.len() == total_count;
        for line in lines {
            Self::write_line(out, &line)?;
            line_count += 1;
        }
        Ok(if is_whole {
            Printed::All(line_count)
        } else {
            Printed::Part(line_count)
        })
    }

    fn write_line(out: &mut impl Write, line: &str) -> std::io::Result<()> {
        writeln!(out, "{line}")?;
        out.flush()
    }

    fn progress_line(&self, shard: ShardRevision) -> String {
        if self.json {
            let mut value = json!({ "type": "progress" });
            add_position(&mut value, shard);
            value.to_string()
        } else {
            format!("progress rev={}", format_position(shard))
        }
    }

    fn snapshot_line(&self, shard: ShardRevision, key: &[u8], entry: Option<&Entry>) -> String {
        let key = String::from_utf8_lossy(key);
        if self.json {
            // The fields of a `scan -o json` item, and the core and revision of the snapshot.
            let mut value = entry.map_or_else(|| json!({}), entry_json);
            if let Some(object) = value.as_object_mut() {
                object.remove("found");
            }
            value["type"] = Value::from("snapshot");
            value["key"] = Value::from(key.as_ref());
            add_position(&mut value, shard);
            value.to_string()
        } else {
            let value = entry.map(|entry| String::from_utf8_lossy(&entry.value));
            format!(
                "snapshot {key} {} rev={}",
                value.unwrap_or_default(),
                format_position(shard)
            )
        }
    }

    fn event_line(&self, shard: ShardRevision, event: &WatchEvent) -> String {
        let key = String::from_utf8_lossy(&event.key);
        let previous = event
            .previous
            .as_ref()
            .map(|previous| String::from_utf8_lossy(previous));
        let type_name = match event.kind {
            EventKind::Put { .. } => "put",
            EventKind::Deleted => "delete",
            EventKind::Expired => "expire",
            EventKind::LeaseEnded { expired: false, .. } => "revoke",
            EventKind::LeaseEnded { expired: true, .. } => "lease-expire",
            EventKind::Left { .. } => "left",
        };
        if self.json {
            let mut value = json!({ "type": type_name, "key": key });
            if let EventKind::Put {
                create_revision,
                version,
            }
            | EventKind::Left {
                create_revision,
                version,
            } = event.kind
            {
                value["value"] = Value::from(String::from_utf8_lossy(&event.value));
                value["create_revision"] = Value::from(create_revision);
                value["version"] = Value::from(version);
            }
            if let EventKind::LeaseEnded { lease, .. } = event.kind {
                value["lease"] = Value::from(lease);
            }
            if !event.fields.is_empty() {
                value["fields"] = query::fields_json(&event.fields);
            }
            add_position(&mut value, shard);
            if self.previous {
                value["previous"] = previous.map_or(Value::Null, Value::from);
            }
            return value.to_string();
        }
        let mut line = match event.kind {
            EventKind::Put { version, .. } | EventKind::Left { version, .. } => {
                let mut line = format!(
                    "{type_name} {key} {} rev={} version={version}",
                    String::from_utf8_lossy(&event.value),
                    format_position(shard)
                );
                if !event.fields.is_empty() {
                    line.push(' ');
                    line.push_str(&query::fields_text(&event.fields));
                }
                line
            }
            EventKind::Deleted | EventKind::Expired => {
                format!("{type_name} {key} rev={}", format_position(shard))
            }
            EventKind::LeaseEnded { lease, .. } => {
                format!(
                    "{type_name} {key} rev={} lease={lease}",
                    format_position(shard)
                )
            }
        };
        if let Some(previous) = previous.filter(|_| self.previous) {
            line.push_str(" previous=");
            line.push_str(&previous);
        }
        line
    }
}

/// Adds `node_id`, `core_id` and `revision` to a JSON line.
fn add_position(value: &mut Value, shard: ShardRevision) {
    value["node_id"] = Value::from(shard.node_id);
    value["core_id"] = Value::from(shard.core_id);
    value["revision"] = Value::from(shard.revision);
}

/// Ctrl-C (SIGINT) and SIGTERM while `watch` or `lease keepalive --every-ms` runs: the first
/// asks it to stop at its next check (so `watch` can print where to resume); a second ends
/// the process at once.
///
/// The handler only stores the signal's number in an atomic and calls `_exit`, both safe in a
/// signal handler. It is declared here against the C library std already links, rather than
/// through a crate, because the client's only dependencies are its runtime and CLI parser.
#[cfg(unix)]
mod interrupt {
    use std::ffi::c_int;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// The first signal received, 0 for none.
    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    const SIGINT: c_int = 2;
    const SIGTERM: c_int = 15;

    extern "C" {
        /// `signal(2)`; the previous handler is returned as a plain address, since it may
        /// be `SIG_DFL` (0) or `SIG_ERR` (-1), which are not function pointers.
        fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
        fn _exit(status: c_int) -> !;
    }

    extern "C" fn on_signal(signum: c_int) {
        if RECEIVED.swap(signum, Ordering::SeqCst) != 0 {
            // SAFETY: `_exit` is async-signal-safe and takes any status.
            unsafe { _exit(128 + signum) }
        }
    }

    /// Replaces the default handlers (which end the process at once).
    pub fn install() {
        for signum in [SIGINT, SIGTERM] {
            // SAFETY: `on_signal` only touches an atomic and calls `_exit`, both
            // async-signal-safe; replacing a default handler affects nothing else.
            unsafe {
                signal(signum, on_signal);
            }
        }
    }

    /// The signal that asked to stop, if one did.
    pub fn received() -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signum => Some(signum),
        }
    }
}

/// The exit status of a command a signal stopped: 128 + the signal's number.
fn interrupted_exit_code(signal: i32) -> ExitCode {
    ExitCode::from(u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(u8::MAX))
}

/// Elsewhere signals keep their default action: they end the process without the resume
/// line.
#[cfg(not(unix))]
mod interrupt {
    pub fn install() {}

    pub fn received() -> Option<i32> {
        None
    }
}

/// Runs a `lease` command, with an async client on a runtime of this command's own (see the
/// module docs).
fn run_lease(cli: &Cli, command: &LeaseCommand) -> Result<ExitCode, Failure> {
    let json = cli.output == Output::Json;
    // One thread suffices: the command waits on every call it makes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::Local(format!("cannot start the client runtime: {error}")))?;
    let config = client_config(cli);
    let code = runtime.block_on(async move {
        // Connected and dropped inside the runtime, which runs its connections' tasks.
        let client = Client::connect_with(config).await?;
        match command {
            LeaseCommand::Grant { ttl_ms } => lease_grant(&client, *ttl_ms, json).await,
            LeaseCommand::Keepalive {
                ids,
                every_ms: None,
            } => lease_keepalive(&client, ids, json).await,
            LeaseCommand::Keepalive {
                ids,
                every_ms: Some(every_ms),
            } => keep_leases_alive(&client, ids, Duration::from_millis(*every_ms), json).await,
            LeaseCommand::Revoke { id } => {
                let revoked = client.revoke_lease(*id).await?;
                answer(
                    json,
                    &json!({ "revoked": revoked }),
                    if revoked { "revoked" } else { "not found" },
                );
                Ok(exit_found(revoked))
            }
            LeaseCommand::Ttl { id, keys } => lease_ttl(&client, *id, *keys, json).await,
            LeaseCommand::List => {
                let ids = client.leases().await?;
                if json {
                    print_json(&json!({ "ids": ids }));
                } else {
                    let mut out = std::io::stdout().lock();
                    for id in ids {
                        let _ = writeln!(out, "{id}");
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })?;
    Ok(code)
}

/// `tessera lock`: takes the lock on a lease this command renews, prints the token, holds
/// the lock until interrupted, then releases it and ends the lease.
fn run_lock(cli: &Cli, name: &str, wait_ms: Option<u64>, ttl_ms: u64) -> Result<ExitCode, Failure> {
    let json = cli.output == Output::Json;
    interrupt::install();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::Local(format!("cannot start the client runtime: {error}")))?;
    let config = client_config(cli);
    let code = runtime.block_on(async move {
        let client = Client::connect_with(config).await?;
        let lease = client.lease(Duration::from_millis(ttl_ms)).await?;
        let longest = Duration::from_millis(u64::from(LOCK_WAIT_MS_MAX));
        let wait = wait_ms.map_or(longest, |wait_ms| Duration::from_millis(wait_ms).min(longest));
        let grant = loop {
            let far = Instant::now() + longest;
            tokio::select! {
                granted = client.lock(name, lease.id(), wait) => match granted? {
                    Some(grant) => break grant,
                    None if wait_ms.is_some() => {
                        let _ = client.revoke_lease(lease.id()).await;
                        answer(json, &json!({ "acquired": false }), "busy: another holder kept the lock");
                        return Ok::<_, ClientError>(ExitCode::from(1));
                    }
                    None => {}
                },
                signal = sleep_until_interrupted(far) => {
                    let _ = client.revoke_lease(lease.id()).await;
                    return Ok(signal.map_or(ExitCode::from(1), interrupted_exit_code));
                }
            }
        };
        if json {
            print_json(&json!({ "token": grant.token, "lease": lease.id(), "name": name }));
        } else {
            println!("{}", grant.token);
        }
        let _ = std::io::stdout().flush();
        loop {
            if let Some(signal) = interrupt::received() {
                let _ = client.unlock(name, grant.token).await;
                let _ = client.revoke_lease(lease.id()).await;
                return Ok(interrupted_exit_code(signal));
            }
            if !lease.is_alive() {
                eprintln!("tessera: lost the lock {name:?}: its lease ended before it was renewed");
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(KEEPALIVE_INTERRUPT_CHECK_INTERVAL).await;
        }
    })?;
    Ok(code)
}

/// Exit status 0 if what the command looked for was found, else 1.
fn exit_found(is_found: bool) -> ExitCode {
    if is_found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Milliseconds of a duration the server gave in milliseconds.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Grants a lease nothing renews and prints its id. JSON: `{"id", "ttl_ms"}`.
async fn lease_grant(client: &Client, ttl_ms: u64, json: bool) -> Result<ExitCode, ClientError> {
    let id = client.grant_lease(Duration::from_millis(ttl_ms)).await?;
    answer(json, &json!({ "id": id, "ttl_ms": ttl_ms }), id);
    Ok(ExitCode::SUCCESS)
}

/// A lease's answer to a keepalive: its TTL, or `None` if it does not live.
type Renewal = (u64, Option<Duration>);

/// The leases named, each once, in the order first named: each is renewed and printed once.
fn distinct(ids: &[u64]) -> Vec<u64> {
    let mut distinct: Vec<u64> = Vec::with_capacity(ids.len());
    for &id in ids {
        if !distinct.contains(&id) {
            distinct.push(id);
        }
    }
    distinct
}

/// Renews `ids` in one round; exit status 1 if any does not live.
async fn lease_keepalive(
    client: &Client,
    ids: &[u64],
    json: bool,
) -> Result<ExitCode, ClientError> {
    let ids = distinct(ids);
    let renewals = renew(client, &ids).await?;
    print_renewals(json, &renewals);
    Ok(exit_found(renewals.iter().all(|(_, ttl)| ttl.is_some())))
}

/// One keepalive round for `ids`, each paired with its answer.
async fn renew(client: &Client, ids: &[u64]) -> Result<Vec<Renewal>, ClientError> {
    let ttls = client.keepalive(ids).await?;
    assert_eq!(ttls.len(), ids.len(), "one answer per lease: ids={ids:?}");
    Ok(ids.iter().copied().zip(ttls).collect())
}

/// Prints `<id> ttl=<ms>` or `<id> not found` per lease; JSON: one line,
/// `{"leases": [{"id", "found", "ttl_ms"}, ...]}`.
fn print_renewals(json: bool, renewals: &[Renewal]) {
    if json {
        let leases: Vec<Value> = renewals
            .iter()
            .map(|(id, ttl)| match ttl {
                Some(ttl) => json!({ "id": id, "found": true, "ttl_ms": millis(*ttl) }),
                None => json!({ "id": id, "found": false }),
            })
            .collect();
        print_json(&json!({ "leases": leases }));
        return;
    }
    let mut out = std::io::stdout().lock();
    for (id, ttl) in renewals {
        let _ = match ttl {
            Some(ttl) => writeln!(out, "{id} ttl={}", millis(*ttl)),
            None => writeln!(out, "{id} not found"),
        };
    }
}

/// How often `lease keepalive --every-ms` checks for Ctrl-C between rounds: the longest it
/// takes to stop.
const KEEPALIVE_INTERRUPT_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Renews `ids` every `every` until a signal (exit 128 + its number), until none lives (exit
/// 1), or until no round has succeeded for longer than the longest TTL, by when the server
/// has ended them all (exit 2). Prints the first round in full, then only the leases whose
/// answer changed; a lease that ended is renewed no more, since it never comes back.
async fn keep_leases_alive(
    client: &Client,
    ids: &[u64],
    every: Duration,
    json: bool,
) -> Result<ExitCode, ClientError> {
    interrupt::install();
    let mut live = distinct(ids);
    // What was last printed for each lease.
    let mut printed: HashMap<u64, Option<Duration>> = HashMap::with_capacity(live.len());
    // When the last round that succeeded was sent: every lease it renewed lives at least a
    // TTL from then.
    let mut renewed_at: Option<Instant> = None;
    let mut ttl_max = Duration::ZERO;
    let mut round_at = Instant::now();
    loop {
        match renew(client, &live).await {
            Ok(renewals) => {
                if renewed_at.is_none() {
                    warn_if_too_slow(every, &renewals);
                }
                renewed_at = Some(round_at);
                for (_, ttl) in &renewals {
                    ttl_max = ttl_max.max(ttl.unwrap_or_default());
                }
                let changed: Vec<Renewal> = renewals
                    .into_iter()
                    .filter(|&(id, ttl)| printed.insert(id, ttl) != Some(ttl))
                    .collect();
                if !changed.is_empty() {
                    print_renewals(json, &changed);
                }
                live.retain(|id| printed.get(id).is_some_and(Option::is_some));
                if live.is_empty() {
                    return Ok(ExitCode::from(1));
                }
            }
            // The first round fails as the single one does: nothing is known to live.
            Err(error) => {
                let Some(renewed_at) = renewed_at else {
                    return Err(error);
                };
                let since_renewal = renewed_at.elapsed();
                if since_renewal > ttl_max {
                    eprintln!(
                        "tessera: no renewal succeeded for {} ms, longer than the longest \
                         TTL ({} ms): the leases have ended",
                        millis(since_renewal),
                        millis(ttl_max)
                    );
                    return Err(error);
                }
                report_error(json, &error, None);
                eprintln!("tessera: renewing again in {} ms", millis(every));
            }
        }
        // A fixed schedule, unless a round outlasted it.
        round_at = (round_at + every).max(Instant::now());
        if let Some(signal) = sleep_until_interrupted(round_at).await {
            return Ok(interrupted_exit_code(signal));
        }
    }
}

/// Warns when `every` is not shorter than the shortest TTL: such a lease may end between
/// two renewals.
fn warn_if_too_slow(every: Duration, renewals: &[Renewal]) {
    let shortest = renewals
        .iter()
        .filter_map(|&(id, ttl)| Some((ttl?, id)))
        .min();
    if let Some((ttl, id)) = shortest.filter(|(ttl, _)| every >= *ttl) {
        eprintln!(
            "tessera: warning: --every-ms {} is not shorter than the TTL of lease {id} ({} \
             ms), which may end between renewals; a third of it leaves room for two lost \
             rounds",
            millis(every),
            millis(ttl)
        );
    }
}

/// Sleeps until `deadline`, or until a signal asks to stop: returns its number.
async fn sleep_until_interrupted(deadline: Instant) -> Option<i32> {
    loop {
        if let Some(signal) = interrupt::received() {
            return Some(signal);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        tokio::time::sleep(left.min(KEEPALIVE_INTERRUPT_CHECK_INTERVAL)).await;
    }
}

/// Prints a lease's TTL and time left (and its keys with `keys`); exit status 1 if it does
/// not live. JSON: `{"id", "found", "ttl_ms", "remaining_ms", "keys", "more"}`, `keys` only
/// when asked.
async fn lease_ttl(
    client: &Client,
    id: u64,
    keys: bool,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let Some(info) = client.lease_info(id).await? else {
        answer(json, &json!({ "id": id, "found": false }), "not found");
        return Ok(ExitCode::from(1));
    };
    if json {
        let mut value = json!({
            "id": info.id,
            "found": true,
            "ttl_ms": millis(info.ttl),
            "remaining_ms": millis(info.remaining),
            "more": info.more,
        });
        if keys {
            value["keys"] = info
                .keys
                .iter()
                .map(|key| Value::from(String::from_utf8_lossy(key).as_ref()))
                .collect();
        }
        print_json(&value);
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "id={} ttl={} remaining={}",
        info.id,
        millis(info.ttl),
        millis(info.remaining)
    );
    if keys {
        for key in &info.keys {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(key));
        }
        if info.more {
            // On stderr, so the lines on stdout stay keys.
            eprintln!("tessera: lease {id} has more keys attached than were listed");
        }
    }
    Ok(ExitCode::SUCCESS)
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

/// Writes a key as `tessera put` asks.
fn put(client: &BlockingClient, arguments: &PutArguments, json: bool) -> Result<(), ClientError> {
    let mut options = PutOptions::new();
    if let Some(ttl_ms) = arguments.ttl_ms {
        options = options.ttl(Duration::from_millis(ttl_ms));
    }
    // Clap lets at most one condition through.
    if arguments.if_absent {
        options = options.if_absent();
    }
    if arguments.if_present {
        options = options.if_present();
    }
    if let Some(version) = arguments.if_version {
        options = options.if_version(version);
    }
    if let Some(value) = &arguments.if_value {
        options = options.if_value(value.as_bytes());
    }
    if arguments.keep_ttl {
        options = options.keep_ttl();
    }
    if let Some(lease) = arguments.lease {
        options = options.lease(lease);
    }
    options = options.fields(arguments.fields.iter().cloned());
    let outcome = client.put_with(&arguments.key, &arguments.value, options)?;
    print_put(json, outcome.applied, outcome.mod_revision, outcome.version);
    Ok(())
}

/// Removes a key as `tessera del` asks. JSON: `{"deleted", "version"}`, the version being
/// the key's current one when the condition failed (0 otherwise).
fn delete(
    client: &BlockingClient,
    arguments: &DelArguments,
    json: bool,
) -> Result<(), ClientError> {
    let mut options = DeleteOptions::new();
    if let Some(version) = arguments.if_version {
        options = options.if_version(version);
    }
    if let Some(value) = &arguments.if_value {
        options = options.if_value(value.as_bytes());
    }
    let outcome = client.delete_with(&arguments.key, options)?;
    let text = if outcome.deleted {
        "deleted".to_owned()
    } else if outcome.version == 0 {
        // Only an existing key has a version: this one was missing.
        "not found".to_owned()
    } else {
        not_applied_text(outcome.version)
    };
    answer(
        json,
        &json!({ "deleted": outcome.deleted, "version": outcome.version }),
        text,
    );
    Ok(())
}

/// What a put (or `counter set`) prints. JSON: `{"applied", "mod_revision", "version"}`.
fn print_put(json: bool, applied: bool, mod_revision: u64, version: u64) {
    if json {
        print_json(&json!({
            "applied": applied,
            "mod_revision": mod_revision,
            "version": version,
        }));
    } else if applied {
        println!("OK (mod_revision {mod_revision})");
    } else {
        println!("{}", not_applied_text(version));
    }
}

/// The line of a conditional write whose condition failed; `version` is the key's current
/// one (0 if it does not exist), so a caller can retry without reading first.
fn not_applied_text(version: u64) -> String {
    format!("not applied (condition failed, current version {version})")
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

/// Lines of the rolling `stats` view between two headers.
const STATS_HEADER_EVERY: u64 = 20;

/// The rolling view's interval when only `--count` is given.
const STATS_INTERVAL_MS_DEFAULT: u64 = 1000;

/// How often the rolling view looks for Ctrl-C while it waits for the next line.
const STATS_INTERRUPT_CHECK: Duration = Duration::from_millis(50);

/// One sample of the totals across every core of every node.
#[derive(Debug, Clone, Copy, Default)]
struct StatsTotals {
    key_count: u64,
    memory_bytes: u64,
    memory_bytes_max: u64,
    request_count: u64,
    /// Summed per node: every core of a node reports the node's count.
    connection_count: u64,
    expired_count: u64,
    watcher_count: u64,
    log_sync_count: u64,
    log_record_count: u64,
}

impl StatsTotals {
    fn of(all_stats: &[tessera_client::CoreStats]) -> Self {
        let mut totals = Self::default();
        let mut connections_by_node: HashMap<u32, u64> = HashMap::new();
        for stats in all_stats {
            totals.key_count += stats.key_count;
            totals.memory_bytes += stats.memory_bytes;
            totals.memory_bytes_max += stats.memory_bytes_max;
            totals.request_count += stats.request_count;
            totals.expired_count += stats.expired_count;
            totals.watcher_count += stats.watcher_count;
            totals.log_sync_count += stats.log_sync_count;
            totals.log_record_count += stats.log_record_count;
            let node = connections_by_node.entry(stats.node_id).or_default();
            *node = (*node).max(stats.connection_count);
        }
        totals.connection_count = connections_by_node.values().sum();
        totals
    }
}

/// Rates between two samples; `None` on the first line.
#[derive(Debug, Clone, Copy)]
struct StatsRates {
    requests_per_second: f64,
    expired_per_second: f64,
    syncs_per_second: f64,
    /// Records the logs wrote per sync since the last line (`None` with no sync).
    records_per_sync: Option<f64>,
}

impl StatsRates {
    #[allow(
        clippy::cast_precision_loss,
        reason = "counter deltas per interval are far below 2^52"
    )]
    fn between(previous: &StatsTotals, current: &StatsTotals, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
        let delta = |now: u64, before: u64| now.saturating_sub(before) as f64;
        let syncs = delta(current.log_sync_count, previous.log_sync_count);
        let records = delta(current.log_record_count, previous.log_record_count);
        Self {
            requests_per_second: delta(current.request_count, previous.request_count) / seconds,
            expired_per_second: delta(current.expired_count, previous.expired_count) / seconds,
            syncs_per_second: syncs / seconds,
            records_per_sync: (syncs > 0.0).then(|| records / syncs),
        }
    }
}

/// Prints a line of totals every interval until `--count` lines, Ctrl-C or an error.
fn stats_rolling(
    client: &BlockingClient,
    arguments: &StatsArguments,
    json: bool,
) -> Result<ExitCode, ClientError> {
    interrupt::install();
    let interval =
        Duration::from_millis(arguments.interval_ms.unwrap_or(STATS_INTERVAL_MS_DEFAULT));
    let mut previous: Option<(Instant, StatsTotals)> = None;
    let mut printed_count = 0_u64;
    loop {
        let sampled = Instant::now();
        let totals = StatsTotals::of(&client.stats()?);
        let rates = previous
            .map(|(before, earlier)| StatsRates::between(&earlier, &totals, sampled - before));
        if json {
            print_stats_json_line(&totals, rates.as_ref());
        } else {
            if printed_count % STATS_HEADER_EVERY == 0 {
                println!(
                    "{:>12} {:>10} {:>6} {:>10} {:>6} {:>10} {:>8} {:>8} {:>8}",
                    "keys",
                    "memory",
                    "mem%",
                    "req/s",
                    "conns",
                    "expired/s",
                    "watchers",
                    "syncs/s",
                    "rec/sync"
                );
            }
            print_stats_line(&totals, rates.as_ref());
        }
        let _ = std::io::stdout().flush();
        printed_count += 1;
        if arguments.count.is_some_and(|count| printed_count >= count) {
            return Ok(ExitCode::SUCCESS);
        }
        previous = Some((sampled, totals));
        let next = sampled + interval;
        loop {
            if let Some(signal) = interrupt::received() {
                return Ok(interrupted_exit_code(signal));
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            std::thread::sleep((next - now).min(STATS_INTERRUPT_CHECK));
        }
    }
}

#[allow(
    clippy::cast_precision_loss,
    reason = "a percentage for people to read"
)]
fn print_stats_line(totals: &StatsTotals, rates: Option<&StatsRates>) {
    let rate =
        |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |value| format!("{value:.0}"));
    let memory_percent = if totals.memory_bytes_max == 0 {
        "-".to_owned()
    } else {
        format!(
            "{:.1}",
            totals.memory_bytes as f64 * 100.0 / totals.memory_bytes_max as f64
        )
    };
    println!(
        "{:>12} {:>10} {:>6} {:>10} {:>6} {:>10} {:>8} {:>8} {:>8}",
        totals.key_count,
        human_bytes(totals.memory_bytes),
        memory_percent,
        rate(rates.map(|rates| rates.requests_per_second)),
        totals.connection_count,
        rate(rates.map(|rates| rates.expired_per_second)),
        totals.watcher_count,
        rate(rates.map(|rates| rates.syncs_per_second)),
        rates
            .and_then(|rates| rates.records_per_sync)
            .map_or_else(|| "-".to_owned(), |records| format!("{records:.1}")),
    );
}

fn print_stats_json_line(totals: &StatsTotals, rates: Option<&StatsRates>) {
    println!(
        "{}",
        json!({
            "key_count": totals.key_count,
            "memory_bytes": totals.memory_bytes,
            "memory_bytes_max": totals.memory_bytes_max,
            "request_count": totals.request_count,
            "connection_count": totals.connection_count,
            "expired_count": totals.expired_count,
            "watcher_count": totals.watcher_count,
            "log_sync_count": totals.log_sync_count,
            "log_record_count": totals.log_record_count,
            "requests_per_second": rates.map(|rates| rates.requests_per_second),
            "expired_per_second": rates.map(|rates| rates.expired_per_second),
            "syncs_per_second": rates.map(|rates| rates.syncs_per_second),
            "records_per_sync": rates.and_then(|rates| rates.records_per_sync),
        })
    );
}

/// `bytes` in binary units with one decimal (`512B`, `1.5K`, `12.0M`, `3.2G`).
#[allow(clippy::cast_precision_loss, reason = "one decimal for people to read")]
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
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

fn node_state_name(state: tessera_client::NodeState) -> &'static str {
    match state {
        tessera_client::NodeState::Up => "up",
        tessera_client::NodeState::Down => "down",
        tessera_client::NodeState::Unknown => "unknown",
    }
}

/// Prints every node's state; exit status 1 unless every node is up.
fn print_cluster_status(status: &tessera_client::ClusterStatus, json: bool) -> ExitCode {
    let all_up = status
        .nodes
        .iter()
        .all(|node| node.state == tessera_client::NodeState::Up);
    if json {
        let nodes: Vec<Value> = status
            .nodes
            .iter()
            .map(|node| {
                let seen_by: Vec<Value> = node
                    .seen_by
                    .iter()
                    .map(|(observer, seen)| {
                        json!({
                            "observer": observer,
                            "state": node_state_name(seen.state),
                            "last_heard_ms": seen.last_heard_ms,
                            "epoch": seen.epoch,
                            "restarts": seen.restarts,
                        })
                    })
                    .collect();
                json!({
                    "node_id": node.node_id,
                    "name": node.name,
                    "addresses": node.addresses,
                    "state": node_state_name(node.state),
                    "answered": node.answer.is_ok(),
                    "round_trip_us": node.answer.as_ref().ok().map(Duration::as_micros),
                    "error": node.answer.as_ref().err(),
                    "epoch": node.epoch,
                    "seen_by": seen_by,
                })
            })
            .collect();
        print_json(&json!({ "epoch": status.epoch, "nodes": nodes }));
    } else {
        println!("epoch {}", status.epoch);
        println!(
            "{:<6} {:<16} {:<24} {:<6} {:<8} {:<8} detail",
            "node", "name", "address", "cores", "epoch", "state"
        );
        for node in &status.nodes {
            let down_views = node
                .seen_by
                .iter()
                .filter(|(_, seen)| seen.state == tessera_client::NodeState::Down)
                .map(|(observer, seen)| match seen.last_heard_ms {
                    Some(ms) => format!("node {observer}: no heartbeat for {ms} ms"),
                    None => format!("node {observer}: never heard"),
                })
                .collect::<Vec<_>>();
            let mut detail = match &node.answer {
                Ok(round_trip) => format!("answered in {} us", round_trip.as_micros()),
                Err(error) => format!("no answer: {error}"),
            };
            if !down_views.is_empty() {
                detail = format!("{detail}; down for {}", down_views.join(", "));
            }
            println!(
                "{:<6} {:<16} {:<24} {:<6} {:<8} {:<8} {detail}",
                node.node_id,
                node.name,
                node.addresses.first().map_or("", String::as_str),
                node.addresses.len(),
                node.epoch
                    .map_or_else(|| "-".to_owned(), |epoch| epoch.to_string()),
                node_state_name(node.state),
            );
        }
    }
    if all_up {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
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

/// An entry as `get`, `scan`, `txn` and `watch` print it in JSON; `fields` only when it has
/// some, so entries without fields print as they always have.
fn entry_json(entry: &Entry) -> Value {
    let mut value = json!({
        "found": true,
        "value": String::from_utf8_lossy(&entry.value),
        "create_revision": entry.create_revision,
        "mod_revision": entry.mod_revision,
        "version": entry.version,
        "expires_at_ms": entry.expires_at_ms,
    });
    if !entry.fields.is_empty() {
        value["fields"] = query::fields_json(&entry.fields);
    }
    value
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
