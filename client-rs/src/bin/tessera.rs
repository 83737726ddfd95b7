//! `tessera`: the command-line client.
//!
//! Human-readable output by default, `-o json` for scripts. Exit status: 0 on success, 1 when
//! `get` finds no key, 2 on any error (connection, server refusal, bad arguments), and
//! 128 + the signal's number when `watch` is interrupted (130 for Ctrl-C).
//!
//! `watch` prints one line per event and flushes it at once, so a pipe sees each event when it
//! happens. When it stops, for whatever reason, it prints on stderr the positions to resume
//! from (`resume with: --from <node>:<core>:<revision>...`): what it printed in full, so a
//! resumed watch skips no event, and repeats some only of a revision `--count` cut short.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tessera_client::{
    BlockingClient, ClientConfig, ClientError, Entry, EventKind, KeyRange, PutOptions, ScanOptions,
    ShardRevision, Topology, TtlState, WatchEvent, WatchMessage, WatchOptions,
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
    /// Ping every core of every node.
    Ping,
    /// Show nodes, cores, addresses and slot ranges.
    Topology,
    /// Show every core's counters (keys, revision, memory, requests).
    Stats,
}

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
}

const WATCH_AFTER_HELP: &str = "\
Examples:
  tessera watch user:                          changes from now on
  tessera watch user: --snapshot               the keys first, then the changes
  tessera watch user: --from 1:0:17 1:1:9      resume after these positions
  tessera -o json watch user: --count 10       ten events as NDJSON

Positions are per core: <node>:<core>:<revision>, as the rev= of each line shows. A
resume needs one for every core; `resume with:` on stderr lists them all. A revision that
--count cut short is resumed from its start, so its first events print again.

Exit status: 0 after --count events, 130 on Ctrl-C (128 + the signal), 2 on an error,
such as a watch that lagged behind or asked for compacted history.";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            // `watch` prints NDJSON, whose lines a reader tells apart by their type.
            let fields =
                matches!(cli.command, Command::Watch(_)).then(|| json!({ "type": "error" }));
            report_error(cli.output == Output::Json, &error, fields);
            ExitCode::from(2)
        }
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
        Command::Watch(arguments) => return watch(&client, arguments, json),
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
        WatchEnd::Interrupted(signal) => {
            ExitCode::from(u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(u8::MAX))
        }
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
        };
        if self.json {
            let mut value = json!({ "type": type_name, "key": key });
            if let EventKind::Put {
                create_revision,
                version,
            } = event.kind
            {
                value["value"] = Value::from(String::from_utf8_lossy(&event.value));
                value["create_revision"] = Value::from(create_revision);
                value["version"] = Value::from(version);
            }
            add_position(&mut value, shard);
            if self.previous {
                value["previous"] = previous.map_or(Value::Null, Value::from);
            }
            return value.to_string();
        }
        let mut line = match event.kind {
            EventKind::Put { version, .. } => format!(
                "put {key} {} rev={} version={version}",
                String::from_utf8_lossy(&event.value),
                format_position(shard)
            ),
            EventKind::Deleted | EventKind::Expired => {
                format!("{type_name} {key} rev={}", format_position(shard))
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

/// Ctrl-C (SIGINT) and SIGTERM while `watch` runs: the first asks it to stop at its next
/// check, so it can print where to resume; a second ends the process at once.
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

/// Elsewhere signals keep their default action: they end the process without the resume
/// line.
#[cfg(not(unix))]
mod interrupt {
    pub fn install() {}

    pub fn received() -> Option<i32> {
        None
    }
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
