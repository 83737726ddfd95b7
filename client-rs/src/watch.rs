//! Watches: the changes to a range of keys as one async [`Stream`], merged across shards.
//!
//! A watch on one key asks the key's core; a watch on a range asks every core, since keys
//! are spread over shards by hash. One task per shard opens the shard's watch, turns what
//! the server pushes into [`WatchMessage`]s and, when its connection breaks, opens it again
//! after the last revision it delivered, so nothing is lost or repeated (bounded attempts
//! with backoff). Within a shard messages keep the shard's order; across shards they
//! interleave, since shards have no common order (`docs/semantics.md`).
//!
//! Memory is bounded end to end: the server cancels a watch whose queue passes its bound,
//! the client's per-stream buffer is bounded the same way, and the merged stream holds a
//! few messages per shard. A consumer that falls behind gets [`ClientError::Lagged`] with the
//! last revision it was given, after every message before it.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::Stream;
use tessera_protocol::codec::check_watch;
use tessera_protocol::ErrorCode;
use tessera_protocol::Query;
use tessera_protocol::{
    slot_for_key, EventBatch, Request, Response, ShardLocation, Watch as WatchRequest, WatchCancel,
    WatchEvents, WatchFrom, Watching,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use tessera_protocol::{EventKind, WatchEvent};

use crate::connection::{server_error, StreamNext};
use crate::scan::{KeyRange, ScanItem, ShardRevision};
use crate::transport::TransportStream;
use crate::{unexpected, Client, ClientError, Result};

/// Messages the merged stream buffers per shard before a shard's task waits.
const MERGED_MESSAGES_PER_SHARD: usize = 16;

/// Where a watch starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WatchStart {
    /// With the next change.
    #[default]
    Now,
    /// With each shard's live keys of the range first ([`WatchMessage::Snapshot`]), then
    /// every change after that snapshot's revision.
    Snapshot,
    /// After the given revision of each shard (a resume): every shard the watch covers
    /// must be listed, as [`Watch::positions`] or an error gives them.
    After(Vec<ShardRevision>),
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchOptions {
    /// Where it starts.
    pub start: WatchStart,
    /// Deliver puts.
    pub puts: bool,
    /// Deliver deletes and expiries.
    pub deletes: bool,
    /// Include each key's previous value.
    pub previous: bool,
    /// Have each shard send a progress notification this often (`None` for only on
    /// request).
    pub progress_interval: Option<Duration>,
    /// Times a shard's watch is reopened in a row after its connection fails before the
    /// stream gives up with the error (default 20, about half a minute of backoff).
    pub resume_attempts_max: u32,
    /// Follow the result set of this predicate over the keys' fields: keys entering or
    /// changing in it come as puts, keys leaving it as [`EventKind::Left`] (still there,
    /// no longer matching) or as their delete; a snapshot holds only matching keys.
    pub query: Option<Query>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            start: WatchStart::Now,
            puts: true,
            deletes: true,
            previous: false,
            progress_interval: None,
            resume_attempts_max: 20,
            query: None,
        }
    }
}

impl WatchOptions {
    /// Puts and deletes from now on.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Start with a snapshot of the range.
    #[must_use]
    pub fn snapshot(mut self) -> Self {
        self.start = WatchStart::Snapshot;
        self
    }

    /// Resume after these revisions.
    #[must_use]
    pub fn after(mut self, positions: Vec<ShardRevision>) -> Self {
        self.start = WatchStart::After(positions);
        self
    }

    /// Include previous values.
    #[must_use]
    pub fn previous(mut self) -> Self {
        self.previous = true;
        self
    }

    /// Only puts.
    #[must_use]
    pub fn puts_only(mut self) -> Self {
        self.deletes = false;
        self
    }

    /// Only deletes and expiries.
    #[must_use]
    pub fn deletes_only(mut self) -> Self {
        self.puts = false;
        self
    }

    /// Periodic progress notifications.
    #[must_use]
    pub fn progress_every(mut self, interval: Duration) -> Self {
        self.progress_interval = Some(interval);
        self
    }

    /// Only changes to the result set of `query` (see [`WatchOptions::query`]).
    #[must_use]
    pub fn query(mut self, query: Query) -> Self {
        self.query = Some(query);
        self
    }
}

/// One item of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// A shard's live keys of the range at `shard.revision`, in key order (first, with
    /// [`WatchStart::Snapshot`]); its events follow from the next revision.
    Snapshot {
        /// The shard and the revision of the snapshot.
        shard: ShardRevision,
        /// The keys and their entries.
        items: Vec<ScanItem>,
    },
    /// Every matching change of one shard revision, in the order applied.
    Events {
        /// The shard and the revision.
        shard: ShardRevision,
        /// The changes.
        events: Vec<WatchEvent>,
    },
    /// Every change of the shard's range up to `shard.revision` has been delivered.
    Progress(ShardRevision),
}

impl WatchMessage {
    /// The shard and revision the message reflects.
    #[must_use]
    pub fn shard(&self) -> ShardRevision {
        match self {
            Self::Snapshot { shard, .. } | Self::Events { shard, .. } | Self::Progress(shard) => {
                *shard
            }
        }
    }
}

/// An open watch: a [`Stream`] of [`WatchMessage`]s. It ends after its first error; drop it
/// to stop watching.
#[derive(Debug)]
pub struct Watch {
    receiver: mpsc::Receiver<Result<WatchMessage>>,
    tasks: Vec<JoinHandle<()>>,
    progress: watch::Sender<u64>,
    /// The last revision delivered from each shard, in topology order.
    positions: Vec<ShardRevision>,
    is_done: bool,
}

impl Watch {
    /// The last revision this stream has yielded from each shard it watches (its start, before
    /// anything): pass them to [`WatchOptions::after`] to resume.
    #[must_use]
    pub fn positions(&self) -> Vec<ShardRevision> {
        self.positions.clone()
    }

    /// Asks every shard for a progress notification.
    pub fn request_progress(&self) {
        self.progress.send_modify(|count| *count += 1);
    }

    fn note(&mut self, shard: ShardRevision) {
        match self
            .positions
            .iter_mut()
            .find(|position| (position.node_id, position.core_id) == (shard.node_id, shard.core_id))
        {
            Some(position) => position.revision = position.revision.max(shard.revision),
            None => self.positions.push(shard),
        }
    }
}

impl Stream for Watch {
    type Item = Result<WatchMessage>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.is_done {
            return Poll::Ready(None);
        }
        match this.receiver.poll_recv(context) {
            Poll::Ready(Some(Ok(message))) => {
                this.note(message.shard());
                Poll::Ready(Some(Ok(message)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.is_done = true;
                this.abort();
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                this.is_done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Watch {
    fn abort(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Each task's stream is dropped with it, which ends the watch on the server.
        self.abort();
    }
}

/// One shard's part of a watch, as its task runs it.
struct ShardWatch {
    client: Client,
    location: ShardLocation,
    node_id: u32,
    core_id: u16,
    request: WatchRequest,
    resume_attempts_max: u32,
    output: mpsc::Sender<Result<WatchMessage>>,
    progress: watch::Receiver<u64>,
    /// Told the outcome of the first open, which `Client::watch` waits for; `None` after.
    opened: Option<oneshot::Sender<Result<ShardRevision>>>,
}

impl Client {
    /// Watches the keys of `range`: a stream of snapshots, changes and progress
    /// notifications, merged across the shards that can hold them. Returns once the watch is
    /// open on every one of them, so every change applied after it returns is delivered.
    ///
    /// # Errors
    /// A bound is longer than a key, the range is empty, a resume lacks a shard's position,
    /// or a shard refuses the watch ([`ClientError::Compacted`] for a resume its history no
    /// longer holds, `Overloaded` past a watcher limit) or cannot be reached. Nothing is left
    /// open on any shard. Errors after that arrive on the stream.
    pub async fn watch(&self, range: &KeyRange, options: WatchOptions) -> Result<Watch> {
        let progress_interval_ms = match options.progress_interval {
            None => 0,
            // Rounded up: an interval shorter than a millisecond must not turn progress off.
            Some(interval) => u32::try_from(interval.as_millis().max(1)).unwrap_or(u32::MAX),
        };
        check_watch(
            &range.start,
            range.end.as_deref(),
            options.puts,
            options.deletes,
            progress_interval_ms,
        )?;
        if let Some(query) = &options.query {
            tessera_protocol::query::check_query(query)
                .map_err(tessera_protocol::RequestError::from)?;
        }
        let view = self.view();
        let locations: Vec<ShardLocation> = if range.is_one_key() {
            vec![view.routes.owner_of_slot(slot_for_key(&range.start))]
        } else {
            view.all_transports()
                .map(|(location, _)| location)
                .collect()
        };
        let positions: HashMap<(u32, u16), u64> = match &options.start {
            WatchStart::After(positions) => positions
                .iter()
                .map(|position| ((position.node_id, position.core_id), position.revision))
                .collect(),
            _ => HashMap::new(),
        };
        // Everything is checked before anything is opened.
        let mut shards = Vec::with_capacity(locations.len());
        for location in locations {
            let (node_id, core_id) = shard_ids(&view.topology, location)?;
            let from = match &options.start {
                WatchStart::Now => WatchFrom::Now,
                WatchStart::Snapshot => WatchFrom::Snapshot,
                WatchStart::After(_) => match positions.get(&(node_id, core_id)) {
                    Some(&revision) => WatchFrom::After(revision),
                    None => return Err(ClientError::MissingPosition { node_id, core_id }),
                },
            };
            shards.push((location, node_id, core_id, from));
        }
        let (output, receiver) = mpsc::channel(MERGED_MESSAGES_PER_SHARD * shards.len().max(1));
        let (progress, progress_receiver) = watch::channel(0);
        let mut watch = Watch {
            receiver,
            tasks: Vec::with_capacity(shards.len()),
            progress,
            positions: Vec::with_capacity(shards.len()),
            is_done: false,
        };
        let mut opened = Vec::with_capacity(shards.len());
        for (location, node_id, core_id, from) in shards {
            let (opened_sender, opened_receiver) = oneshot::channel();
            let shard = ShardWatch {
                client: self.clone(),
                location,
                node_id,
                core_id,
                request: WatchRequest {
                    start: range.start.clone(),
                    end: range.end.clone(),
                    from,
                    puts: options.puts,
                    deletes: options.deletes,
                    previous: options.previous,
                    progress_interval_ms,
                    query: options.query.clone(),
                },
                resume_attempts_max: options.resume_attempts_max,
                output: output.clone(),
                progress: progress_receiver.clone(),
                opened: Some(opened_sender),
            };
            watch.tasks.push(tokio::spawn(shard.run()));
            opened.push(opened_receiver);
        }
        // On an early return, dropping `watch` aborts every task, which closes what opened.
        for opened in join_all(opened).await {
            let position = opened.map_err(|_| ClientError::ShutDown)??;
            watch.positions.push(position);
        }
        Ok(watch)
    }
}

fn shard_ids(topology: &tessera_protocol::Topology, location: ShardLocation) -> Result<(u32, u16)> {
    let node = topology
        .nodes
        .get(usize::from(location.node_index))
        .ok_or_else(|| ClientError::Topology("route table names a missing node".to_owned()))?;
    let core = node
        .cores
        .get(usize::from(location.core_index))
        .ok_or_else(|| ClientError::Topology("route table names a missing core".to_owned()))?;
    Ok((node.node_id, core.core_id))
}

/// Why a shard's watch did not open.
enum Opening {
    /// For good: a refusal, or an error that will not go away.
    Failed(ClientError),
    /// The connection failed (or the server is restarting): worth another try on a resume.
    Broken(ClientError),
}

/// How a shard's stream ended.
enum Ended {
    /// The consumer is gone.
    Finished,
    /// For good, with this error, reported once the stream is dropped (so the server stops
    /// sending even while the consumer has not read the error yet).
    Failed(ClientError),
    /// The connection broke: open the watch again after the last delivered revision.
    Broken(ClientError),
}

impl ShardWatch {
    fn position(&self, revision: u64) -> ShardRevision {
        ShardRevision {
            node_id: self.node_id,
            core_id: self.core_id,
            revision,
        }
    }

    async fn run(mut self) {
        let mut failures = 0;
        loop {
            let error = match self.open().await {
                Ok((watching, stream, address)) => {
                    failures = 0;
                    if let Some(opened) = self.opened.take() {
                        let _ = opened.send(Ok(self.position(watching.revision)));
                    }
                    match self.follow(watching, stream, address).await {
                        Ended::Finished => return,
                        Ended::Failed(error) => {
                            self.fail(error).await;
                            return;
                        }
                        Ended::Broken(error) => error,
                    }
                }
                Err(Opening::Failed(error)) => {
                    self.fail(error).await;
                    return;
                }
                Err(Opening::Broken(error)) if self.opened.is_some() => {
                    // The first open is not retried: the caller hears at once.
                    self.fail(error).await;
                    return;
                }
                Err(Opening::Broken(error)) => error,
            };
            failures += 1;
            if failures > self.resume_attempts_max {
                self.fail(error).await;
                return;
            }
            tracing::debug!(
                node_id = self.node_id,
                core_id = self.core_id,
                failures,
                %error,
                "watch stream broke; resuming"
            );
            tokio::time::sleep(backoff(failures)).await;
        }
    }

    /// Reports `error`: to `Client::watch` if the watch never opened, else on the stream.
    async fn fail(&mut self, error: ClientError) {
        match self.opened.take() {
            Some(opened) => {
                let _ = opened.send(Err(error));
            }
            None => {
                let _ = self.output.send(Err(error)).await;
            }
        }
    }

    /// Opens the shard's watch: its `Watching` reply and stream, and the core's address.
    async fn open(&mut self) -> Result<(Watching, TransportStream, String), Opening> {
        let Some(transport) = self.client.view().transport(self.location) else {
            let error = ClientError::Topology("route table names a missing core".to_owned());
            return Err(Opening::Failed(error));
        };
        let request = Request::Watch(Box::new(self.request.clone()));
        let (response, stream) = match transport.open_stream(&request).await {
            Ok(opened) => opened,
            Err(error) if error.is_retryable() || error.is_indeterminate() => {
                return Err(Opening::Broken(error))
            }
            Err(error) => return Err(Opening::Failed(error)),
        };
        Err(match (response, stream) {
            (Response::Watching(watching), Some(stream)) => {
                return Ok((watching, stream, transport.address().to_owned()))
            }
            (Response::WatchCancelled(WatchCancel::Compacted { oldest_available }), _) => {
                Opening::Failed(ClientError::Compacted {
                    node_id: self.node_id,
                    core_id: self.core_id,
                    oldest_available,
                })
            }
            (Response::Error(reply), _)
                if matches!(reply.code, ErrorCode::ShuttingDown | ErrorCode::Overloaded) =>
            {
                // A server restarting, or one whose watchers are catching up: worth another
                // try when resuming (a first open reports it at once).
                Opening::Broken(server_error(reply.code, reply.message))
            }
            (Response::Error(reply), _) => Opening::Failed(server_error(reply.code, reply.message)),
            (other, _) => Opening::Failed(unexpected(&other)),
        })
    }

    /// Forwards the stream's messages until it ends.
    async fn follow(
        &mut self,
        watching: Watching,
        mut stream: TransportStream,
        address: String,
    ) -> Ended {
        let mut last = watching.revision;
        // From here on, a reopen resumes after what was delivered.
        self.request.from = WatchFrom::After(last);
        if let Some(items) = watching.snapshot {
            let snapshot = WatchMessage::Snapshot {
                shard: self.position(last),
                items,
            };
            if self.output.send(Ok(snapshot)).await.is_err() {
                return Ended::Finished;
            }
        }
        // A revision split over several messages, joined before it is handed on.
        let mut partial: Option<EventBatch> = None;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                changed = self.progress.changed() => {
                    if changed.is_err() {
                        // The `Watch` is gone.
                        return Ended::Finished;
                    }
                    stream.request_progress();
                    continue;
                }
            };
            let response = match next {
                StreamNext::Message(response) => response,
                StreamNext::Overflowed => return self.lagged(last),
                StreamNext::Closed => return Ended::Broken(ClientError::Disconnected { address }),
            };
            let is_open = match response {
                Response::WatchEvents(events) => {
                    match self.forward_events(events, &mut partial, &mut last).await {
                        Ok(is_open) => is_open,
                        Err(error) => return Ended::Failed(error),
                    }
                }
                Response::WatchProgress { revision } if partial.is_none() && revision >= last => {
                    last = revision;
                    self.request.from = WatchFrom::After(last);
                    let message = WatchMessage::Progress(self.position(revision));
                    self.output.send(Ok(message)).await.is_ok()
                }
                Response::WatchProgress { .. } => true,
                Response::WatchCancelled(WatchCancel::Lagged { last_delivered }) => {
                    return self.lagged(last_delivered.min(last))
                }
                Response::WatchCancelled(WatchCancel::Compacted { oldest_available }) => {
                    return Ended::Failed(ClientError::Compacted {
                        node_id: self.node_id,
                        core_id: self.core_id,
                        oldest_available,
                    });
                }
                other => return Ended::Failed(unexpected(&other)),
            };
            if !is_open {
                return Ended::Finished;
            }
        }
    }

    /// Hands on the whole revisions of `events`, joining one split over several messages.
    /// Returns `false` once the consumer is gone.
    ///
    /// # Errors
    /// A revision marked as continued is not continued by the next message.
    async fn forward_events(
        &mut self,
        events: WatchEvents,
        partial: &mut Option<EventBatch>,
        last: &mut u64,
    ) -> Result<bool> {
        let count = events.batches.len();
        for (index, batch) in events.batches.into_iter().enumerate() {
            let batch = match partial.take() {
                Some(mut joined) if joined.revision == batch.revision => {
                    joined.events.extend(batch.events);
                    joined
                }
                Some(joined) => {
                    return Err(ClientError::UnexpectedReply(format!(
                        "revision {} was to continue, but revision {} came next",
                        joined.revision, batch.revision
                    )))
                }
                None => batch,
            };
            if events.continues && index + 1 == count {
                *partial = Some(batch);
                continue;
            }
            *last = batch.revision;
            self.request.from = WatchFrom::After(batch.revision);
            let message = WatchMessage::Events {
                shard: self.position(batch.revision),
                events: batch.events,
            };
            if self.output.send(Ok(message)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn lagged(&self, last_delivered: u64) -> Ended {
        Ended::Failed(ClientError::Lagged {
            node_id: self.node_id,
            core_id: self.core_id,
            last_delivered,
        })
    }
}

/// The wait before the `failures`-th reopen in a row: doubling from 50 ms to 2 s, jittered.
fn backoff(failures: u32) -> Duration {
    crate::jittered_backoff(failures, Duration::from_millis(50), Duration::from_secs(2))
}
