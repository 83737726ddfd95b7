//! Watch streams: a shard's watchers served to clients, over a client connection or, in
//! embedded mode, over an in-process channel.
//!
//! A [`Stream`] ties one watcher of the shard's [`WatchHub`] to the id the client knows it
//! by. Whoever owns the stream (a connection, or the core's [`SinkSet`]) calls
//! [`Stream::pump`] when the hub may have something for it; the pump turns what is queued
//! into `WatchEvents` messages within the room the owner has, then a progress notification
//! when one is due, or the cancellation.
//!
//! **Invariants**
//! - Events leave only in revision order, each once, and a revision split over several
//!   messages is marked `continues` on all but its last.
//! - In `sync` mode a revision's events leave only once it is on disk, like replies do: a
//!   watcher never sees a change that a crash could undo.
//! - The bytes waiting for a reader are bounded: the owner's room (a connection's write
//!   buffer, a channel's `connection_write_buffer_bytes_max`) plus the hub's queue bound,
//!   past which the watcher is cancelled `Lagged`.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_channel::mpsc;
use futures_lite::StreamExt;
use tessera_protocol::codec::FrameBuffer;
use tessera_protocol::limits::{SCAN_LIMIT_MAX, WATCH_FRAME_BYTES_MAX};
use tessera_protocol::message::{ArchivedWatch, ArchivedWatchFrom};
use tessera_protocol::{
    ErrorCode, EventBatch, EventKind, Response, WatchCancel, WatchEvent, WatchEvents, Watching,
};

use crate::core::{encode_reply_body, error, CoreContext};
use crate::shard::watch::{
    Batch, Cancelled, Change, DeleteCause, Event, Start, WatchError, WatchHub, WatchId, WatchSpec,
};

/// One open watch, as its owner keeps it.
#[derive(Debug)]
pub struct Stream {
    /// What the client names the watch by.
    pub watch_id: u64,
    /// The watcher in the shard's hub.
    pub hub_id: WatchId,
    /// 0 for no periodic progress notifications.
    progress_interval_ms: u64,
    /// When the next periodic progress notification is due.
    next_progress_ms: u64,
    /// A progress notification was asked for and not sent yet.
    is_progress_requested: bool,
}

/// What a pump left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// The stream goes on; `is_waiting` if it still has queued events it had no room (or
    /// durability) for.
    Open {
        /// Events are still queued.
        is_waiting: bool,
    },
    /// The watch was cancelled; the cancellation was emitted and the watcher removed.
    Ended,
}

/// Opens a watch on this core's shard: registers the watcher and returns it with the
/// `Watching` reply, or the refusal to send instead. `watch_id` names it for the client;
/// `None` names it by its hub id (embedded mode, where there is no request id).
///
/// # Errors
/// The refusal: `WatchCancelled(Compacted)` when the history no longer reaches back to the
/// revision asked for, an error response otherwise.
pub fn open(
    context: &CoreContext,
    now_ms: u64,
    watch_id: Option<u64>,
    watch: &ArchivedWatch,
) -> Result<(Stream, Response), Response> {
    let spec = WatchSpec {
        start: Box::from(watch.start.as_slice()),
        end: watch.end.as_ref().map(|end| Box::from(end.as_slice())),
        puts: watch.puts,
        deletes: watch.deletes,
        previous: watch.previous,
        query: match watch.query.as_ref() {
            Some(query) => Some(
                tessera_protocol::codec::owned_query(query)
                    .map_err(|decode| error(ErrorCode::Internal, decode.to_string()))?,
            ),
            None => None,
        },
    };
    let mut shard = context.shard.borrow_mut();
    let opened = match watch.from {
        ArchivedWatchFrom::Snapshot => shard
            .watch_with_snapshot(now_ms, spec, SCAN_LIMIT_MAX as usize)
            .map(|(hub_id, revision, items)| (hub_id, revision, Some(items))),
        ArchivedWatchFrom::Now => {
            let revision = shard.revision();
            shard
                .watch_hub()
                .watch(spec, Start::Now)
                .map(|hub_id| (hub_id, revision, None))
        }
        ArchivedWatchFrom::After(revision) => {
            let revision = revision.to_native();
            shard
                .watch_hub()
                .watch(spec, Start::After(revision))
                .map(|hub_id| (hub_id, revision, None))
        }
    };
    let (hub_id, revision, snapshot) =
        opened.map_err(|watch_error| refusal(context, &watch_error))?;
    let progress_interval_ms = u64::from(watch.progress_interval_ms.to_native());
    let stream = Stream {
        watch_id: watch_id.unwrap_or(hub_id),
        hub_id,
        progress_interval_ms,
        next_progress_ms: now_ms.saturating_add(progress_interval_ms),
        is_progress_requested: false,
    };
    let watching = Response::Watching(Watching {
        watch_id: stream.watch_id,
        node_id: context.node_id,
        core_id: context.core_id,
        revision,
        snapshot,
    });
    Ok((stream, watching))
}

fn refusal(context: &CoreContext, watch_error: &WatchError) -> Response {
    match watch_error {
        WatchError::Compacted { oldest_available } => {
            Response::WatchCancelled(WatchCancel::Compacted {
                oldest_available: *oldest_available,
            })
        }
        WatchError::TooManyWatchers { .. } => error(
            ErrorCode::Overloaded,
            format!(
                "core {}: {watch_error} (watchers_per_shard_max)",
                context.core_id
            ),
        ),
        WatchError::QueuesFull { .. } => error(
            ErrorCode::Overloaded,
            format!(
                "core {}: {watch_error} (watch_queue_total_bytes_max)",
                context.core_id
            ),
        ),
        WatchError::FutureRevision { .. } => error(
            ErrorCode::InvalidArgument,
            format!("core {}: {watch_error}", context.core_id),
        ),
        WatchError::SnapshotTooLarge { .. } => error(
            ErrorCode::TooLarge,
            format!("core {}: {watch_error}", context.core_id),
        ),
    }
}

impl Stream {
    /// Asks for a progress notification with the next pump.
    pub fn request_progress(&mut self) {
        self.is_progress_requested = true;
    }

    /// When this stream next needs a pump with nothing published: its next periodic
    /// progress notification, if it has them.
    pub fn progress_due_ms(&self) -> Option<u64> {
        (self.progress_interval_ms > 0).then_some(self.next_progress_ms)
    }

    /// Emits what is due: queued events of revisions up to `durable`, about `room` bytes of
    /// them (a first revision whatever its size), then a progress notification if one is
    /// due and nothing is left queued; or the cancellation, after which the watcher is gone.
    ///
    /// A lone revision that another watcher of the same spec just received is sent as the
    /// body `encoded` already holds, not encoded again: with many watchers of one prefix, a
    /// write is archived once, not once per watcher.
    pub fn pump(
        &mut self,
        hub: &mut WatchHub,
        now_ms: u64,
        room: usize,
        durable: u64,
        encoded: &mut EncodedBatch,
        emit: &mut impl Emit,
    ) -> Pumped {
        if room > 0 && hub.has_pending(self.hub_id) {
            match hub.take_through(self.hub_id, room, durable) {
                Some(Ok(batches)) => match batches.as_slice() {
                    // A watcher keeping up takes one revision at a time: archived once for
                    // every watcher that shares it. One behind takes several, in one message
                    // (fewer messages for a reader that is already slow).
                    [batch] if batch_cost(batch) <= WATCH_FRAME_BYTES_MAX => {
                        emit.body(encoded.body_for(batch));
                    }
                    _ => emit_events(&batches, &mut |response| emit.response(response)),
                },
                Some(Err(Cancelled::Lagged { last_delivered })) => {
                    hub.unwatch(self.hub_id);
                    emit.response(&Response::WatchCancelled(WatchCancel::Lagged {
                        last_delivered,
                    }));
                    return Pumped::Ended;
                }
                None => return Pumped::Ended,
            }
        }
        let is_waiting = hub.has_pending(self.hub_id);
        let is_interval_due = self.progress_interval_ms > 0 && now_ms >= self.next_progress_ms;
        if is_interval_due {
            // While events wait, they are the progress: the notification is skipped, not
            // kept due (which would wake the owner on every pass until the queue drains).
            self.next_progress_ms = now_ms.saturating_add(self.progress_interval_ms);
        }
        if (is_interval_due || self.is_progress_requested) && !is_waiting {
            if let Some(revision) = hub.progress(self.hub_id) {
                // Never past what is on disk (`sync`): a resume from there must not skip
                // revisions a crash could undo.
                emit.response(&Response::WatchProgress {
                    revision: revision.min(durable),
                });
            }
            self.is_progress_requested = false;
        }
        Pumped::Open { is_waiting }
    }
}

/// Where a pump's messages go: responses to encode, or bodies already archived.
pub trait Emit {
    /// Sends `response` on the stream.
    fn response(&mut self, response: &Response);
    /// Sends an archived response body on the stream.
    fn body(&mut self, body: &[u8]);
}

/// Revisions whose archived bytes a core keeps for the watchers that share them.
const ENCODED_BATCHES_MAX: usize = 256;

/// Bytes of archived revisions a core keeps (a larger one is archived, used, and dropped).
const ENCODED_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The archived `WatchEvents` of recent revisions, each alone, kept so the watchers of one
/// spec (which share each batch) get the same bytes without encoding them again, whether
/// they are level or some revisions apart. One per core; the oldest entry goes first past
/// `ENCODED_BATCHES_MAX` entries or `ENCODED_BYTES_MAX` bytes.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// By the batch's address; the `Rc` kept in the entry keeps the address from reuse.
    entries: HashMap<usize, (Rc<Batch>, FrameBuffer)>,
    /// Addresses, oldest first.
    order: VecDeque<usize>,
    bytes: usize,
}

impl EncodedBatch {
    /// The archived `WatchEvents` of `batch` alone, encoded unless it is kept.
    fn body_for(&mut self, batch: &Rc<Batch>) -> &[u8] {
        let address = Rc::as_ptr(batch) as usize;
        if !self.entries.contains_key(&address) {
            let message = Response::WatchEvents(WatchEvents {
                batches: vec![to_wire_batch(batch)],
                continues: false,
            });
            // A push carries its own revisions. Under `WATCH_FRAME_BYTES_MAX` it fits a frame.
            let body = encode_reply_body(None, &message);
            while !self.order.is_empty()
                && (self.order.len() >= ENCODED_BATCHES_MAX
                    || self.bytes + body.len() > ENCODED_BYTES_MAX)
            {
                if let Some((_, evicted)) = self
                    .order
                    .pop_front()
                    .and_then(|oldest| self.entries.remove(&oldest))
                {
                    self.bytes -= evicted.len();
                }
            }
            self.bytes += body.len();
            self.order.push_back(address);
            self.entries.insert(address, (batch.clone(), body));
        }
        self.entries
            .get(&address)
            .map_or(&[][..], |(_, body)| &body[..])
    }
}

fn to_wire_batch(batch: &Batch) -> EventBatch {
    EventBatch {
        revision: batch.revision,
        events: batch.events.iter().map(to_wire).collect(),
    }
}

fn batch_cost(batch: &Batch) -> usize {
    batch.events.iter().map(Event::cost).sum()
}

/// Turns taken batches into `WatchEvents` messages of about `WATCH_FRAME_BYTES_MAX` bytes
/// each, splitting a revision too large for one.
fn emit_events(batches: &[Rc<Batch>], emit: &mut impl FnMut(&Response)) {
    let mut message = WatchEvents {
        batches: Vec::new(),
        continues: false,
    };
    let mut bytes = 0;
    for batch in batches {
        message.batches.push(EventBatch {
            revision: batch.revision,
            events: Vec::with_capacity(batch.events.len()),
        });
        for event in &batch.events {
            let cost = event.cost();
            if bytes > 0 && bytes + cost > WATCH_FRAME_BYTES_MAX {
                let has_events = message
                    .batches
                    .last()
                    .is_some_and(|last| !last.events.is_empty());
                if !has_events {
                    // The revision starts in the next message.
                    message.batches.pop();
                }
                message.continues = has_events;
                emit(&Response::WatchEvents(std::mem::replace(
                    &mut message,
                    WatchEvents {
                        batches: vec![EventBatch {
                            revision: batch.revision,
                            events: Vec::new(),
                        }],
                        continues: false,
                    },
                )));
                bytes = 0;
            }
            bytes += cost;
            if let Some(last) = message.batches.last_mut() {
                last.events.push(to_wire(event));
            }
        }
    }
    if !message.batches.is_empty() {
        emit(&Response::WatchEvents(message));
    }
}

fn to_wire(event: &Event) -> WatchEvent {
    let kind = match event.change {
        Change::Put {
            create_revision,
            version,
        } => EventKind::Put {
            create_revision,
            version,
        },
        Change::Delete(DeleteCause::Deleted) => EventKind::Deleted,
        Change::Delete(DeleteCause::Expired) => EventKind::Expired,
        Change::Delete(DeleteCause::LeaseEnded { lease, expired }) => {
            EventKind::LeaseEnded { lease, expired }
        }
        Change::Left {
            create_revision,
            version,
        } => EventKind::Left {
            create_revision,
            version,
        },
    };
    WatchEvent {
        key: event.key().to_vec(),
        kind,
        value: event.value().unwrap_or_default().to_vec(),
        previous: event.previous().map(<[u8]>::to_vec),
        fields: crate::shard::fields::to_fields(event.fields()),
    }
}

/// The revision whose events may leave now: the log's durable revision in `sync` mode,
/// any otherwise.
pub fn deliverable_revision(context: &CoreContext) -> u64 {
    match &context.log {
        Some(log) if log.is_gating() => log.durable_revision(),
        _ => u64::MAX,
    }
}

/// Creates the channel an in-process client receives a watch's messages on.
pub fn channel() -> (WatchSink, WatchReceiver) {
    let (sender, receiver) = mpsc::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        WatchSink {
            sender,
            queued: queued.clone(),
        },
        WatchReceiver { receiver, queued },
    )
}

/// The core's end of an in-process watch channel. Bounded by the bytes its reader has not
/// taken yet, which the core keeps under `connection_write_buffer_bytes_max`.
#[derive(Debug)]
pub struct WatchSink {
    sender: mpsc::UnboundedSender<FrameBuffer>,
    queued: Arc<AtomicUsize>,
}

impl Emit for WatchSink {
    fn response(&mut self, response: &Response) {
        // A push carries its own revisions.
        let body = encode_reply_body(None, response);
        self.send(body);
    }

    fn body(&mut self, body: &[u8]) {
        let mut copy = FrameBuffer::with_capacity(body.len());
        copy.extend_from_slice(body);
        self.send(copy);
    }
}

impl WatchSink {
    fn send(&self, body: FrameBuffer) {
        self.queued.fetch_add(body.len(), Ordering::Relaxed);
        // A reader that just went away is noticed on the next pump.
        let _ = self.sender.unbounded_send(body);
    }
}

/// The reader's end of an in-process watch channel: archived response bodies.
#[derive(Debug)]
pub struct WatchReceiver {
    receiver: mpsc::UnboundedReceiver<FrameBuffer>,
    queued: Arc<AtomicUsize>,
}

impl WatchReceiver {
    /// The next archived response body, or `None` once the core dropped the watch.
    pub async fn next(&mut self) -> Option<FrameBuffer> {
        let body = self.receiver.next().await?;
        self.queued.fetch_sub(body.len(), Ordering::Relaxed);
        Some(body)
    }
}

/// The core's in-process watch streams (embedded mode), pumped by [`serve_sinks`].
#[derive(Debug, Default)]
pub struct SinkSet {
    streams: Vec<(Stream, WatchSink)>,
}

impl SinkSet {
    /// Adopts a stream whose messages go to `sink`.
    pub fn add(&mut self, stream: Stream, sink: WatchSink) {
        self.streams.push((stream, sink));
    }

    /// Whether there are streams to pump.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Ends the stream named `watch_id`; whether it existed.
    pub fn remove(&mut self, hub: &mut WatchHub, watch_id: u64) -> bool {
        let Some(position) = self
            .streams
            .iter()
            .position(|(stream, _)| stream.watch_id == watch_id)
        else {
            return false;
        };
        let (stream, _) = self.streams.swap_remove(position);
        hub.unwatch(stream.hub_id);
        true
    }

    /// Asks the stream named `watch_id` for a progress notification; its hub progress, or
    /// `None` if there is no such stream.
    pub fn request_progress(&mut self, hub: &WatchHub, watch_id: u64) -> Option<u64> {
        let (stream, _) = self
            .streams
            .iter_mut()
            .find(|(stream, _)| stream.watch_id == watch_id)?;
        stream.request_progress();
        hub.progress(stream.hub_id)
    }

    /// Pumps every stream; drops those whose reader is gone or that ended.
    fn pump_all(
        &mut self,
        hub: &mut WatchHub,
        now_ms: u64,
        room_max: usize,
        durable: u64,
        encoded: &mut EncodedBatch,
    ) {
        self.streams.retain_mut(|(stream, sink)| {
            if sink.sender.is_closed() {
                hub.unwatch(stream.hub_id);
                return false;
            }
            let room = room_max.saturating_sub(sink.queued.load(Ordering::Relaxed));
            stream.pump(hub, now_ms, room, durable, encoded, sink) != Pumped::Ended
        });
    }
}

/// Pumps the core's in-process watch streams whenever the shard publishes, the log makes
/// more durable, or a tick passes while there are streams (for progress notifications, and
/// for readers that made room), until the core stops.
pub async fn serve_sinks(context: std::rc::Rc<CoreContext>) {
    if let Some(log) = &context.log {
        log.subscribe(context.watch.wake_sinks.clone());
    }
    while context
        .stop
        .unless_fired(context.watch.wake_sinks.notified())
        .await
        .is_some()
    {
        let mut sinks = context.watch.sinks.borrow_mut();
        if sinks.is_empty() {
            continue;
        }
        let now_ms = crate::clock::now_unix_ms();
        let durable = deliverable_revision(&context);
        let room_max = context.config.connection_write_buffer_bytes_max;
        let mut shard = context.shard.borrow_mut();
        let mut encoded = context.watch.encoded.borrow_mut();
        sinks.pump_all(shard.watch_hub(), now_ms, room_max, durable, &mut encoded);
    }
    // Readers see their channel end once the sinks are dropped.
    let mut sinks = context.watch.sinks.borrow_mut();
    let mut shard = context.shard.borrow_mut();
    for (stream, _) in sinks.streams.drain(..) {
        shard.watch_hub().unwatch(stream.hub_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(revision: u64, event_count: usize, value_size: usize) -> Batch {
        let value = vec![b'v'; value_size];
        let events = (0..event_count)
            .map(|index| {
                let key = format!("k{revision}/{index}");
                Event::put(revision, key.as_bytes(), &value, revision, 1, None)
            })
            .collect();
        Batch { revision, events }
    }

    /// Emits `batches` and returns the messages.
    fn emitted(batches: &[Batch]) -> Vec<WatchEvents> {
        let mut messages = Vec::new();
        let shared: Vec<Rc<Batch>> = batches.iter().cloned().map(Rc::new).collect();
        emit_events(&shared, &mut |response: &Response| match response {
            Response::WatchEvents(events) => messages.push(events.clone()),
            other => panic!("unexpected {other:?}"),
        });
        messages
    }

    /// Joins messages the way a receiver must: a `continues` revision with the next one.
    fn joined(messages: &[WatchEvents]) -> Vec<(u64, usize)> {
        let mut revisions: Vec<(u64, usize)> = Vec::new();
        let mut is_continued = false;
        for message in messages {
            for (index, batch) in message.batches.iter().enumerate() {
                match revisions.last_mut() {
                    Some((revision, count)) if is_continued && index == 0 => {
                        assert_eq!(*revision, batch.revision, "a continued revision goes on");
                        *count += batch.events.len();
                    }
                    _ => revisions.push((batch.revision, batch.events.len())),
                }
                assert!(!batch.events.is_empty(), "no empty batch is sent");
            }
            is_continued = message.continues;
        }
        assert!(!is_continued, "the last message ends its revision");
        revisions
    }

    #[test]
    fn small_revisions_share_one_message() {
        let batches = vec![batch(3, 2, 10), batch(4, 1, 10), batch(9, 3, 10)];
        let messages = emitted(&batches);
        assert_eq!(messages.len(), 1);
        assert!(!messages[0].continues);
        assert_eq!(joined(&messages), vec![(3, 2), (4, 1), (9, 3)]);
    }

    #[test]
    fn a_large_revision_is_split_and_marked() {
        // 40 events of 100 KiB: about 4 MiB in one revision, then a small one.
        let batches = vec![batch(5, 40, 100 * 1024), batch(6, 1, 10)];
        let messages = emitted(&batches);
        assert!(messages.len() >= 4, "{} messages", messages.len());
        for message in &messages {
            let bytes: usize = message
                .batches
                .iter()
                .flat_map(|batch| &batch.events)
                .map(|event| event.key.len() + event.value.len() + 64)
                .sum();
            assert!(bytes <= WATCH_FRAME_BYTES_MAX + 100 * 1024 + 64, "{bytes}");
        }
        assert_eq!(joined(&messages), vec![(5, 40), (6, 1)]);
    }

    #[test]
    fn a_split_at_a_revision_boundary_is_not_marked() {
        // Two revisions that each nearly fill a message: the cut falls between them.
        let per_revision = WATCH_FRAME_BYTES_MAX / (64 * 1024 + 80);
        let batches = vec![
            batch(1, per_revision, 64 * 1024),
            batch(2, per_revision, 64 * 1024),
        ];
        let messages = emitted(&batches);
        assert_eq!(messages.len(), 2);
        assert!(!messages[0].continues);
        assert_eq!(
            joined(&messages),
            vec![(1, per_revision), (2, per_revision)]
        );
    }

    /// Watchers of one spec share each batch, and the second is sent the bytes archived
    /// for the first; a different batch is archived anew. Both decode to the same message.
    #[test]
    fn a_shared_batch_is_archived_once() {
        let mut encoded = EncodedBatch::default();
        let shared = Rc::new(batch(7, 2, 10));
        let first = encoded.body_for(&shared).to_vec();
        let first_address = encoded.body_for(&shared).as_ptr();
        let later = Rc::new(batch(8, 1, 10));
        let later_body = encoded.body_for(&later).to_vec();
        let again = encoded.body_for(&shared.clone());
        assert_eq!(again, &first[..]);
        assert_eq!(again.as_ptr(), first_address, "kept, not archived again");
        let other = Rc::new(batch(7, 2, 10));
        let other_body = encoded.body_for(&other).to_vec();
        assert_eq!(other_body, first, "equal batches archive equally");
        assert_ne!(later_body, first);
        // Past the entry bound the oldest goes; the bytes stay bounded.
        for revision in 0..2 * ENCODED_BATCHES_MAX as u64 {
            encoded.body_for(&Rc::new(batch(100 + revision, 1, 10)));
        }
        assert!(encoded.entries.len() <= ENCODED_BATCHES_MAX);
        assert_eq!(encoded.entries.len(), encoded.order.len());
        assert_eq!(
            encoded.bytes,
            encoded
                .entries
                .values()
                .map(|(_, body)| body.len())
                .sum::<usize>()
        );
        let decoded = tessera_protocol::codec::decode_response(&first).unwrap();
        let Response::WatchEvents(events) = decoded else {
            panic!("unexpected {decoded:?}");
        };
        assert!(!events.continues);
        assert_eq!(events.batches.len(), 1);
        assert_eq!(events.batches[0].revision, 7);
        assert_eq!(events.batches[0].events.len(), 2);
    }
}
