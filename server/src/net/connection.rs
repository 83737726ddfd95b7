//! A core's client connections, served from one task over the core's [`SocketRing`].
//!
//! Each pass of the loop: adopt connections the accept loop handed over, frame the replies
//! other cores sent back, then for every connection decode each complete frame in its read
//! buffer (within the limits), answer local requests at once, forward the others, and queue
//! one send of everything buffered and one receive. All queued operations go to the kernel in
//! one submission; the completions that are ready come back from the same system call. The
//! task parks in glommio only when a pass finds nothing to do. Replies may be out of request
//! order; clients match them by request id.
//!
//! **Invariants**
//! - A read buffer is 16-byte aligned and frames leave its front only whole, so every body is
//!   aligned when validated in place. It never grows beyond one maximal frame: a header
//!   announcing more is refused before its body is read.
//! - A buffer the kernel is reading from or writing into (one send and one receive per
//!   connection at most) is neither moved nor freed until its completion has been taken: the
//!   read buffer is compacted or resized only while no receive is in flight, `sending` is
//!   separate from `write_buffer`, and a connection is dropped only with nothing in flight.
//! - An invalid frame is answered (with its request id when the header was intact) and closes
//!   this connection only.
//! - Every request read from the socket is answered before the connection closes, including
//!   during shutdown (requests read after the stop signal get `ShuttingDown`, unapplied),
//!   unless the shutdown timeout fires first (`abort`), which drops what is left.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tessera_protocol::codec::{self, FrameBuffer};
use tessera_protocol::limits::{FRAME_ALIGNMENT, FRAME_HEADER_SIZE, FRAME_SIZE_MAX};
use tessera_protocol::message::{ArchivedRequest, ArchivedWatch};
use tessera_protocol::{ErrorCode, FrameHeader, FrameKind, ProtocolError, Response, ShardStamp};

use crate::core::{error, CoreContext, PendingReply, Reply, Route};
use crate::metrics::Op;
use crate::net::ring::Completion;
pub use crate::net::ring::SocketRing;
use crate::runtime::LocalNotify;
use crate::watch_stream::{self, Pumped, Stream};

/// Bytes a read buffer holds when no large frame is being received.
const READ_BUFFER_SIZE: usize = 64 * 1024;

/// Frames validated and prefetched together before any of them is answered.
const PREFETCH_BATCH_MAX: usize = 32;

/// Operations the ring holds at most; connections beyond what fits wait for room.
const RING_ENTRIES_MAX: usize = 16 * 1024;

/// Kinds of ring operations, in the low bits of a token.
const KIND_SEND: u64 = 0;
const KIND_RECEIVE: u64 = 1;
const KIND_CANCEL: u64 = 2;
const KIND_BITS: u32 = 2;
const GENERATION_BITS: u32 = 30;

/// A connection accepted by the listener, on its way to the connection task.
#[derive(Debug)]
pub struct Accepted {
    /// The socket.
    pub fd: OwnedFd,
    /// The peer's address, for logs.
    pub peer: String,
    /// Counts the connection against the server-wide limit until it is dropped.
    pub slot: ConnectionSlot,
}

/// Decrements the server-wide connection count when a connection ends, however it ends.
#[derive(Debug)]
pub struct ConnectionSlot {
    context: Rc<CoreContext>,
}

impl ConnectionSlot {
    /// Counts one more open connection; returns the slot and the count including it.
    pub fn acquire(context: &Rc<CoreContext>) -> (Self, usize) {
        let count = context.connection_count.fetch_add(1, Ordering::Relaxed) + 1;
        (
            Self {
                context: context.clone(),
            },
            count,
        )
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.context
            .connection_count
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the accept loop hands connections over, and how it wakes the connection task.
#[derive(Debug, Clone)]
pub struct Handoff {
    accepted: Rc<RefCell<Vec<Accepted>>>,
    notify: LocalNotify,
}

impl Handoff {
    /// An empty handoff that wakes the connection task through `notify` (the core's
    /// `wake_connections`, which watchers' events also use).
    pub fn new(notify: LocalNotify) -> Self {
        Self {
            accepted: Rc::default(),
            notify,
        }
    }

    /// Passes a connection to the connection task.
    pub fn push(&self, accepted: Accepted) {
        self.accepted.borrow_mut().push(accepted);
        self.notify.notify();
    }
}

/// A request answered later: its id, what it asked and when its batch began.
#[derive(Clone, Copy)]
struct Asked {
    request_id: u64,
    op: Op,
    started: Instant,
}

/// A reply computed on another core, on its way back to the connection that asked.
struct Forwarded {
    index: usize,
    generation: u32,
    request_id: u64,
    reply: Reply,
    /// What was asked, and when its batch began: the request's latency ends when its reply
    /// is framed.
    op: Op,
    started: Instant,
}

#[allow(
    clippy::struct_excessive_bools,
    reason = "independent flags of one state machine, each documented"
)]
struct Connection {
    fd: OwnedFd,
    peer: String,
    _slot: ConnectionSlot,
    generation: u32,
    /// Received bytes; `[..filled]` is data. Its length is the space a receive may use.
    read_buffer: FrameBuffer,
    filled: usize,
    /// Replies encoded and not yet handed to the kernel.
    write_buffer: FrameBuffer,
    /// Bytes handed to the kernel; `[sent..]` is still to go.
    sending: FrameBuffer,
    sent: usize,
    is_receiving: bool,
    is_sending: bool,
    /// A cancel of the receive in flight has been queued.
    is_cancelling: bool,
    /// Replies other cores still owe this connection.
    forwards_in_flight: usize,
    /// Set once the connection must end: no more reads; close once flushed.
    close_reason: Option<&'static str>,
    /// Buffered bytes will never be written (the peer is gone or the core aborts).
    is_discarding: bool,
    /// Queued in the set's ready list.
    is_ready: bool,
    /// In `sync` mode, which replies in `write_buffer` wait for which revision to be on
    /// disk: `(end offset, revision)`, offsets and revisions increasing. Empty otherwise.
    marks: VecDeque<(usize, u64)>,
    /// Frames of the batch being answered `(header, start, size)`, reused so answering a
    /// batch allocates nothing once warm.
    batch: Vec<(FrameHeader, usize, usize)>,
    /// The ops of the batch's requests answered at once, counted with the batch's service
    /// time when it is done (at most [`PREFETCH_BATCH_MAX`] plus a terminal frame).
    answered: Vec<Op>,
    /// The watches opened on this connection, named by their `Watch` request ids.
    watches: Vec<Stream>,
}

/// Runs every connection of this core over `ring` until the core stops and they have all
/// closed.
pub async fn serve(context: Rc<CoreContext>, handoff: Handoff, ring: SocketRing) {
    if let Some(log) = &context.log {
        // A batch reaching the disk may release replies.
        log.subscribe(handoff.notify.clone());
    }
    let mut set = ConnectionSet {
        context,
        ring,
        slots: Vec::new(),
        free_slots: Vec::new(),
        handoff,
        forwarded: Rc::default(),
        completions: Vec::new(),
        ready: Vec::new(),
        is_stopping: false,
        is_aborting: false,
        durable_revision_seen: 0,
        published_seen: 0,
        deliverable_seen: 0,
        answered: Vec::new(),
    };
    set.run().await;
}

impl SocketRing {
    /// A ring sized for `config`: a send, a receive and a cancel per connection, up to a cap;
    /// connections beyond what fits wait for room.
    ///
    /// # Errors
    /// The kernel refuses the ring.
    pub fn for_config(config: &crate::config::Config) -> std::io::Result<Self> {
        let entries = (3 * config.connection_count_max + 16).min(RING_ENTRIES_MAX);
        Self::new(u32::try_from(entries).unwrap_or(u32::MAX))
    }
}

struct ConnectionSet {
    context: Rc<CoreContext>,
    ring: SocketRing,
    /// Connections by index, with the generation the index had last.
    slots: Vec<(u32, Option<Connection>)>,
    free_slots: Vec<usize>,
    handoff: Handoff,
    forwarded: Rc<RefCell<Vec<Forwarded>>>,
    /// Reused for each pass's completions.
    completions: Vec<Completion>,
    /// Connections to look at in the next pass (each at most once, see `Connection::is_ready`).
    ready: Vec<usize>,
    is_stopping: bool,
    is_aborting: bool,
    /// The log's durable revision when replies were last released.
    durable_revision_seen: u64,
    /// The watch hub's publish count when watching connections were last woken.
    published_seen: u64,
    /// The revision up to which events could leave when watching connections were last
    /// woken.
    deliverable_seen: u64,
    /// The ops of the requests answered in this pass, counted with the pass's service time
    /// when it ends (at most `connection_inflight_max` per connection stepped).
    answered: Vec<Op>,
}

impl ConnectionSet {
    async fn run(&mut self) {
        let mut stepping = Vec::new();
        loop {
            if self.context.abort.is_fired() && !self.is_aborting {
                self.begin_abort();
            }
            if self.context.stop.is_fired() && !self.is_stopping {
                self.begin_stop();
            }
            self.adopt_accepted();
            self.deliver_forwarded();
            self.release_durable();
            let now_ms = crate::clock::now_unix_ms();
            // The clock is read twice per pass (not per request, nor per connection): a
            // request answered in the pass took the pass's time, from the completions that
            // brought it to the sends that carry its reply.
            let pass_started = Instant::now();
            self.wake_watching(now_ms);
            std::mem::swap(&mut stepping, &mut self.ready);
            for &index in &stepping {
                self.step(index, now_ms, pass_started);
            }
            stepping.clear();
            self.record_pass(pass_started);
            // What this pass applied goes to the log now, so it is in the writer's next batch.
            self.context.flush_journal();
            if let Err(ring_error) = self.ring.submit() {
                tracing::error!(%ring_error, "socket ring submit failed; closing connections");
                self.begin_abort();
            }
            self.completions.clear();
            self.ring.take_completions(&mut self.completions);
            let completions = std::mem::take(&mut self.completions);
            for completion in &completions {
                self.complete(*completion);
            }
            self.completions = completions;
            if self.is_stopping && self.is_empty() && self.ring.in_flight_count() == 0 {
                return;
            }
            if self.completions.is_empty() && self.ready.is_empty() {
                self.park().await;
            } else {
                glommio::yield_if_needed().await;
            }
        }
    }

    /// Counts the requests answered in the pass that began at `pass_started`, each with the
    /// pass's time.
    fn record_pass(&mut self, pass_started: Instant) {
        if self.answered.is_empty() {
            return;
        }
        let latency_us = elapsed_us(pass_started, Instant::now());
        let mut metrics = self.context.metrics.borrow_mut();
        for op in self.answered.drain(..) {
            metrics.requests.record(op, latency_us, 1);
        }
    }

    /// Queues connection `index` for the next pass.
    fn mark_ready(&mut self, index: usize) {
        if let Some((_, Some(connection))) = self.slots.get_mut(index) {
            if !connection.is_ready {
                connection.is_ready = true;
                self.ready.push(index);
            }
        }
    }

    /// Once the log has more on disk, connections holding replies that waited for it get a
    /// turn to send them.
    fn release_durable(&mut self) {
        let Some(log) = &self.context.log else { return };
        let durable = log.durable_revision();
        if durable == self.durable_revision_seen {
            return;
        }
        self.durable_revision_seen = durable;
        for index in 0..self.slots.len() {
            let is_waiting = self.slots[index]
                .1
                .as_ref()
                .is_some_and(|connection| !connection.marks.is_empty());
            if is_waiting {
                self.mark_ready(index);
            }
        }
    }

    /// Queues every connection with watches when their watchers may have something to
    /// send: the shard published events, more of them became durable, or a periodic
    /// progress notification is due.
    fn wake_watching(&mut self, now_ms: u64) {
        let (published, watcher_count) = {
            let mut shard = self.context.shard.borrow_mut();
            let hub = shard.watch_hub();
            (hub.published_count(), hub.watcher_count())
        };
        if watcher_count == 0 {
            // Every write publishes; with no watcher there is nobody to look for, and no
            // progress is owed (the tick stops waking this task for it).
            self.published_seen = published;
            self.context.watch.progress_due_ms.set(u64::MAX);
            return;
        }
        let deliverable = watch_stream::deliverable_revision(&self.context);
        let is_progress_due = now_ms >= self.context.watch.progress_due_ms.get();
        if published == self.published_seen
            && deliverable == self.deliverable_seen
            && !is_progress_due
        {
            return;
        }
        self.published_seen = published;
        self.deliverable_seen = deliverable;
        if is_progress_due {
            // Every watching connection is pumped now; each pump folds its next due back in.
            self.context.watch.progress_due_ms.set(u64::MAX);
        }
        for index in 0..self.slots.len() {
            let is_watching = self.slots[index]
                .1
                .as_ref()
                .is_some_and(|connection| !connection.watches.is_empty());
            if is_watching {
                self.mark_ready(index);
            }
        }
    }

    fn mark_all_ready(&mut self) {
        for index in 0..self.slots.len() {
            self.mark_ready(index);
        }
    }

    /// Waits for a completion, a handed-over connection, a forwarded reply, stop or abort.
    async fn park(&mut self) {
        let context = self.context.clone();
        let notify = self.handoff.notify.clone();
        let is_stopping = self.is_stopping;
        let is_aborting = self.is_aborting;
        let signals = async {
            if is_aborting {
                notify.notified().await;
            } else if is_stopping {
                futures_lite::future::or(notify.notified(), context.abort.wait()).await;
            } else {
                futures_lite::future::or(notify.notified(), context.stop.wait()).await;
            }
        };
        futures_lite::future::or(self.ring.wait_signal(), signals).await;
    }

    fn is_empty(&self) -> bool {
        self.slots
            .iter()
            .all(|(_, connection)| connection.is_none())
    }

    fn adopt_accepted(&mut self) {
        let accepted: Vec<Accepted> = self.handoff.accepted.borrow_mut().drain(..).collect();
        for Accepted { fd, peer, slot } in accepted {
            if self.is_stopping {
                // Accepted just before the stop: close at once, nothing was read.
                continue;
            }
            tracing::debug!(%peer, "connection opened");
            let index = self.free_slots.pop().unwrap_or_else(|| {
                self.slots.push((0, None));
                self.slots.len() - 1
            });
            let generation = (self.slots[index].0 + 1) & ((1 << GENERATION_BITS) - 1);
            let mut read_buffer = FrameBuffer::with_capacity(READ_BUFFER_SIZE);
            read_buffer.resize(READ_BUFFER_SIZE, 0);
            self.slots[index] = (
                generation,
                Some(Connection {
                    fd,
                    peer,
                    _slot: slot,
                    generation,
                    read_buffer,
                    filled: 0,
                    write_buffer: FrameBuffer::new(),
                    sending: FrameBuffer::new(),
                    sent: 0,
                    is_receiving: false,
                    is_sending: false,
                    is_cancelling: false,
                    forwards_in_flight: 0,
                    close_reason: None,
                    is_discarding: false,
                    is_ready: false,
                    marks: VecDeque::new(),
                    batch: Vec::with_capacity(PREFETCH_BATCH_MAX),
                    answered: Vec::with_capacity(PREFETCH_BATCH_MAX + 1),
                    watches: Vec::new(),
                }),
            );
            let mut metrics = self.context.metrics.borrow_mut();
            metrics.connections_open += 1;
            metrics.connections_accepted += 1;
            drop(metrics);
            self.mark_ready(index);
        }
    }

    /// Frames the replies other cores have sent back into their connections' write buffers.
    fn deliver_forwarded(&mut self) {
        let forwarded: Vec<Forwarded> = self.forwarded.borrow_mut().drain(..).collect();
        if forwarded.is_empty() {
            return;
        }
        // One clock read for every reply delivered in this pass.
        let now = Instant::now();
        for Forwarded {
            index,
            generation,
            request_id,
            reply,
            op,
            started,
        } in forwarded
        {
            let mut metrics = self.context.metrics.borrow_mut();
            metrics.requests.record(op, elapsed_us(started, now), 1);
            metrics.requests.count_reply(op, &reply);
            drop(metrics);
            let Some((_, Some(connection))) = self.slots.get_mut(index) else {
                continue;
            };
            if connection.generation != generation {
                continue;
            }
            connection.forwards_in_flight -= 1;
            if !connection.is_discarding {
                connection.encode_reply(request_id, &reply);
                connection.gate(self.context.gate_revision());
            }
            self.mark_ready(index);
        }
    }

    /// Everything one connection can do now: answer buffered frames, queue a send and a
    /// receive, or close. A connection that still has work no completion will bring back
    /// (frames held back for fairness) is queued for the next pass.
    fn step(&mut self, index: usize, now_ms: u64, pass_started: Instant) {
        let Some(connection) = self.slots[index].1.as_mut() else {
            return;
        };
        connection.is_ready = false;
        let mut is_held_back = false;
        if !connection.is_receiving {
            is_held_back = if self.is_stopping {
                connection.answer_for_shutdown(
                    &self.context,
                    now_ms,
                    pass_started,
                    &self.forwarded,
                    &self.handoff,
                )
            } else {
                connection.process(
                    &self.context,
                    now_ms,
                    pass_started,
                    &self.forwarded,
                    &self.handoff,
                    index,
                )
            };
            self.answered.append(&mut connection.answered);
            connection.gate(self.context.gate_revision());
        }
        if !connection.watches.is_empty()
            && !connection.is_discarding
            && connection.close_reason.is_none()
        {
            // A closing connection sends what it has and ends; its watches end with it.
            connection.pump_watches(&self.context, now_ms);
        }
        let token_base = token(index, connection.generation, 0);
        let fd = connection.fd.as_raw_fd();
        if !connection.is_sending && !connection.is_discarding {
            if connection.sent == connection.sending.len() && !connection.write_buffer.is_empty() {
                let durable = self.context.log.as_ref().map(|log| log.durable_revision());
                connection.take_sendable(durable);
            }
            if connection.sent < connection.sending.len() && self.ring.has_room() {
                let rest = &connection.sending[connection.sent..];
                // SAFETY: `sending` is neither touched nor freed while `is_sending` (module
                // invariants); the connection is dropped only with nothing in flight.
                let pushed = unsafe {
                    self.ring
                        .push_send(fd, rest.as_ptr(), rest.len(), token_base | KIND_SEND)
                };
                connection.is_sending = pushed.is_ok();
            }
        }
        let wants_receive = connection.close_reason.is_none()
            && !self.is_stopping
            && !connection.is_receiving
            && !connection.has_complete_frame();
        if wants_receive && self.ring.has_room() {
            connection.make_room();
            let space = &mut connection.read_buffer[connection.filled..];
            if !space.is_empty() {
                // SAFETY: the read buffer is compacted or resized only while no receive is in
                // flight (module invariants).
                let pushed = unsafe {
                    self.ring.push_receive(
                        fd,
                        space.as_mut_ptr(),
                        space.len(),
                        token_base | KIND_RECEIVE,
                    )
                };
                connection.is_receiving = pushed.is_ok();
            }
        }
        if connection.is_receiving
            && !connection.is_cancelling
            && (connection.close_reason.is_some() || self.is_stopping)
            && self.ring.has_room()
        {
            // The read waiting in the kernel must end before the connection can drain or
            // close; it completes with what it has, or as cancelled.
            let target = token_base | KIND_RECEIVE;
            connection.is_cancelling = self
                .ring
                .push_cancel(target, token_base | KIND_CANCEL)
                .is_ok();
        }
        if connection.is_finished() {
            let reason = connection.close_reason.unwrap_or("server stopping");
            tracing::debug!(peer = %connection.peer, reason, "connection closed");
            let mut shard = self.context.shard.borrow_mut();
            for stream in connection.watches.drain(..) {
                shard.watch_hub().unwatch(stream.hub_id);
            }
            drop(shard);
            self.context.metrics.borrow_mut().connections_open -= 1;
            self.slots[index].1 = None;
            self.free_slots.push(index);
            return;
        }
        // Work that no completion will bring back: held-back frames, a full ring.
        let is_waiting_for_room = !self.ring.has_room()
            && (wants_receive || (!connection.is_sending && connection.has_unwritten()));
        if is_held_back || is_waiting_for_room {
            self.mark_ready(index);
        }
    }

    fn complete(&mut self, completion: Completion) {
        let Completion { token, result } = completion;
        let kind = token & ((1 << KIND_BITS) - 1);
        let generation =
            u32::try_from((token >> KIND_BITS) & ((1 << GENERATION_BITS) - 1)).unwrap_or(u32::MAX);
        let index = usize::try_from(token >> (KIND_BITS + GENERATION_BITS)).unwrap_or(usize::MAX);
        let Some((_, Some(connection))) = self.slots.get_mut(index) else {
            assert!(
                kind == KIND_CANCEL,
                "completion {token:#x} for a connection that is gone"
            );
            return;
        };
        assert!(
            connection.generation == generation || kind == KIND_CANCEL,
            "completion {token:#x} of generation {generation}, connection has {}",
            connection.generation
        );
        match kind {
            KIND_SEND => {
                connection.is_sending = false;
                match usize::try_from(result) {
                    Ok(size) => {
                        connection.sent += size;
                        if connection.sent == connection.sending.len() {
                            connection.sending.clear();
                            connection.sent = 0;
                        }
                    }
                    Err(_) => connection.fail("write failed", result),
                }
            }
            KIND_RECEIVE => {
                connection.is_receiving = false;
                connection.is_cancelling = false;
                match usize::try_from(result) {
                    Ok(0) => {
                        connection.close_reason.get_or_insert("peer closed");
                    }
                    Ok(size) => connection.filled += size,
                    Err(_) if -result == libc::ECANCELED => {}
                    Err(_) => connection.fail("read failed", result),
                }
            }
            _ => {}
        }
        self.mark_ready(index);
    }

    /// Stop: no more reads once what each socket already holds is answered.
    fn begin_stop(&mut self) {
        self.is_stopping = true;
        self.mark_all_ready();
    }

    /// The shutdown timeout passed: end every connection now, whatever it still has to write.
    fn begin_abort(&mut self) {
        self.is_stopping = true;
        self.is_aborting = true;
        for (_, connection) in &mut self.slots {
            if let Some(connection) = connection {
                connection.close_reason.get_or_insert("aborted");
                connection.is_discarding = true;
                // Makes a send blocked on a client that stopped reading complete at once.
                // SAFETY: shutdown has no memory-safety preconditions; the descriptor is open.
                unsafe {
                    libc::shutdown(connection.fd.as_raw_fd(), libc::SHUT_RDWR);
                }
            }
        }
        self.mark_all_ready();
    }
}

/// Microseconds from `started` to `now`, rounded up (a batch that took any time took at least
/// 1 µs).
fn elapsed_us(started: Instant, now: Instant) -> u64 {
    let nanos = now.saturating_duration_since(started).as_nanos();
    u64::try_from(nanos.div_ceil(1000)).unwrap_or(u64::MAX)
}

fn token(index: usize, generation: u32, kind: u64) -> u64 {
    ((index as u64) << (KIND_BITS + GENERATION_BITS)) | (u64::from(generation) << KIND_BITS) | kind
}

impl Connection {
    /// Whether nothing is in flight, owed or left to write, and the connection should end.
    fn is_finished(&self) -> bool {
        if self.is_receiving || self.is_sending {
            return false;
        }
        if self.is_discarding {
            return true;
        }
        let is_closing = self.close_reason.is_some();
        is_closing && !self.has_unwritten() && self.forwards_in_flight == 0
    }

    /// Records that the replies encoded so far wait for `revision` (if replies wait at all).
    fn gate(&mut self, revision: Option<u64>) {
        let Some(revision) = revision else { return };
        let end = self.write_buffer.len();
        match self.marks.back_mut() {
            Some((mark_end, _)) if *mark_end == end => {}
            Some((mark_end, mark_revision)) if *mark_revision == revision => *mark_end = end,
            _ if end == 0 => {}
            _ => self.marks.push_back((end, revision)),
        }
    }

    /// Moves the replies that may leave now from `write_buffer` into `sending` (which is
    /// empty): all of them, or with `durable` set (`sync` mode) those whose revision is on
    /// disk.
    fn take_sendable(&mut self, durable: Option<u64>) {
        let sendable = match durable {
            Some(durable) if !self.marks.is_empty() => {
                let mut end = 0;
                while let Some(&(mark_end, revision)) = self.marks.front() {
                    if revision > durable {
                        break;
                    }
                    end = mark_end;
                    self.marks.pop_front();
                }
                for (mark_end, _) in &mut self.marks {
                    *mark_end -= end;
                }
                end
            }
            _ => self.write_buffer.len(),
        };
        self.sending.clear();
        self.sent = 0;
        if sendable == self.write_buffer.len() {
            std::mem::swap(&mut self.write_buffer, &mut self.sending);
            self.marks.clear();
        } else if sendable > 0 {
            self.sending
                .extend_from_slice(&self.write_buffer[..sendable]);
            let rest = self.write_buffer.len() - sendable;
            self.write_buffer.copy_within(sendable.., 0);
            self.write_buffer.resize(rest, 0);
        }
    }

    /// Whether encoded replies have not all been handed to the kernel yet.
    fn has_unwritten(&self) -> bool {
        !self.write_buffer.is_empty() || self.sent < self.sending.len()
    }

    fn fail(&mut self, reason: &'static str, result: i32) {
        let io_error = std::io::Error::from_raw_os_error(-result);
        tracing::debug!(peer = %self.peer, %io_error, reason, "connection failed");
        self.close_reason.get_or_insert(reason);
        self.is_discarding = true;
    }

    /// Whether a complete frame waits at the front of the read buffer.
    fn has_complete_frame(&self) -> bool {
        codec::frame_size_needed(&self.read_buffer[..self.filled])
            .is_some_and(|frame_size| frame_size <= self.filled)
    }

    /// Whether a limit stops this connection from taking more requests for now.
    fn is_paused(&self, context: &CoreContext) -> bool {
        self.forwards_in_flight >= context.config.connection_inflight_max
            || self.write_buffer.len() + self.sending.len()
                >= context.config.connection_write_buffer_bytes_max
    }

    /// Answers or dispatches every complete frame in the read buffer, within the limits.
    /// Returns whether frames remain that a limit on this pass (not one a completion will
    /// lift) held back.
    ///
    /// Frames are taken in batches of up to [`PREFETCH_BATCH_MAX`]: the first pass validates
    /// them and asks the shard to prefetch the keys it will touch, the second answers them.
    /// A lookup in a large store is two cache misses; issued together, a batch's misses
    /// overlap instead of stalling one request after another.
    fn process(
        &mut self,
        context: &Rc<CoreContext>,
        now_ms: u64,
        started: Instant,
        forwarded: &Rc<RefCell<Vec<Forwarded>>>,
        handoff: &Handoff,
        index: usize,
    ) -> bool {
        if self.close_reason.is_some() {
            return false;
        }
        let is_stopping = context.stop.is_fired();
        let mut offset = 0;
        let mut handled_count = 0;
        let mut is_held_back = false;
        let mut batch = std::mem::take(&mut self.batch);
        loop {
            if self.is_paused(context) {
                break;
            }
            let room = context.config.connection_inflight_max - handled_count;
            if room == 0 {
                // Fairness: other connections get a turn; this one continues next pass.
                is_held_back = true;
                break;
            }
            if offset == self.filled {
                break;
            }
            // First pass: frame each request (checking its checksum) and prefetch what it
            // will read.
            batch.clear();
            let mut batch_end = offset;
            let mut terminal = None;
            while batch.len() < room.min(PREFETCH_BATCH_MAX) {
                let frame = match codec::decode_frame(&self.read_buffer[batch_end..self.filled]) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(frame_error) => {
                        terminal = Some(frame_error);
                        break;
                    }
                };
                debug_assert_eq!(batch_end % FRAME_ALIGNMENT, 0);
                if frame.header.frame_kind() == Some(FrameKind::Request) && !is_stopping {
                    if let Ok(request) = codec::access_request(frame.body) {
                        context.prefetch(request);
                    }
                }
                batch.push((frame.header, batch_end, frame.frame_size));
                batch_end += frame.frame_size;
            }
            let was_empty = batch.is_empty();
            // Second pass: answer them, in order.
            let mut is_closing = false;
            for (header, frame_start, frame_size) in batch.drain(..) {
                handled_count += 1;
                offset = frame_start + frame_size;
                let body_start = frame_start + FRAME_HEADER_SIZE;
                let body = body_start..body_start + header.body_size as usize;
                let answered = self.answer(
                    context, now_ms, header, body, forwarded, handoff, index, started,
                );
                if !answered {
                    is_closing = true;
                    break;
                }
            }
            if let Some(frame_error) = terminal.filter(|_| !is_closing) {
                tracing::debug!(%frame_error, "closing connection on an invalid frame");
                let code = frame_error.error.code();
                let response = error(code, frame_error.error.to_string());
                self.encode_reply(
                    frame_error.request_id.unwrap_or(0),
                    &Reply::Response(response),
                );
                context
                    .metrics
                    .borrow_mut()
                    .requests
                    .count_error(Op::Invalid, code);
                self.answered.push(Op::Invalid);
                self.close_reason = Some("invalid frame");
                is_closing = true;
            }
            if is_closing || was_empty {
                break;
            }
        }
        batch.clear();
        self.batch = batch;
        self.consume(offset);
        is_held_back
    }

    /// Answers one frame whose checksum the first pass verified (or dispatches it to another
    /// core). Returns `false` when the frame closes the connection, so nothing after it is
    /// answered.
    #[allow(clippy::too_many_arguments, reason = "the loop's state, passed down")]
    fn answer(
        &mut self,
        context: &Rc<CoreContext>,
        now_ms: u64,
        header: FrameHeader,
        body: std::ops::Range<usize>,
        forwarded: &Rc<RefCell<Vec<Forwarded>>>,
        handoff: &Handoff,
        index: usize,
        started: Instant,
    ) -> bool {
        let request_id = header.request_id;
        if header.frame_kind() != Some(FrameKind::Request) {
            let response = error(ErrorCode::BadFrame, "clients may only send request frames");
            self.count_answered(context, Op::Invalid, &response);
            self.encode_reply(request_id, &Reply::Response(response));
            self.close_reason = Some("response frame from a client");
            return false;
        }
        // The read buffer is not modified while this request is answered; its bytes are
        // copied out for a forward, and the response is encoded into the write buffer.
        let read_buffer = std::mem::take(&mut self.read_buffer);
        let outcome = self.answer_body(
            context,
            now_ms,
            request_id,
            &read_buffer[body],
            forwarded,
            handoff,
            index,
            started,
        );
        self.read_buffer = read_buffer;
        outcome
    }

    #[allow(clippy::too_many_arguments, reason = "the loop's state, passed down")]
    fn answer_body(
        &mut self,
        context: &Rc<CoreContext>,
        now_ms: u64,
        request_id: u64,
        body: &[u8],
        forwarded: &Rc<RefCell<Vec<Forwarded>>>,
        handoff: &Handoff,
        index: usize,
        started: Instant,
    ) -> bool {
        let request = match codec::access_request(body) {
            Ok(request) => request,
            Err(protocol_error) => {
                tracing::debug!(%protocol_error, "closing connection on an invalid body");
                let response = error(protocol_error.code(), protocol_error.to_string());
                self.count_answered(context, Op::Invalid, &response);
                self.encode_reply(request_id, &Reply::Response(response));
                self.close_reason = Some("invalid body");
                return false;
            }
        };
        let op = Op::of(request);
        if let Err(request_error) = codec::check_request(request) {
            let response = error(request_error.code(), request_error.to_string());
            self.count_answered(context, op, &response);
            self.encode_reply(request_id, &Reply::Response(response));
            return true;
        }
        if context.stop.is_fired() {
            let response = error(ErrorCode::ShuttingDown, "server is shutting down");
            self.count_answered(context, op, &response);
            self.encode_reply(request_id, &Reply::Response(response));
            return true;
        }
        match request {
            ArchivedRequest::Watch(watch) => {
                self.answered.push(op);
                self.open_watch(context, now_ms, request_id, watch);
                return true;
            }
            ArchivedRequest::Unwatch { watch_id } => {
                self.answered.push(op);
                let existed = self.close_watch(context, watch_id.to_native());
                let response = Response::Unwatched { existed };
                self.encode_stamped(request_id, context.stamp(), &response);
                return true;
            }
            ArchivedRequest::WatchProgress { watch_id } => {
                let watch_id = watch_id.to_native();
                let response = match self
                    .watches
                    .iter_mut()
                    .find(|stream| stream.watch_id == watch_id)
                {
                    Some(stream) => {
                        stream.request_progress();
                        let mut shard = context.shard.borrow_mut();
                        match shard.watch_hub().progress(stream.hub_id) {
                            Some(revision) => Response::WatchProgress { revision },
                            None => Response::Unwatched { existed: true },
                        }
                    }
                    None => Response::Unwatched { existed: false },
                };
                self.answered.push(op);
                self.encode_stamped(request_id, context.stamp(), &response);
                // The stream's queued events, then its progress, go out in this step.
                return true;
            }
            _ => {}
        }
        let asked = Asked {
            request_id,
            op,
            started,
        };
        match context.route(request) {
            Route::Here => {
                let response = context.respond_here(now_ms, request);
                self.count_answered(context, op, &response);
                self.encode_stamped(request_id, context.stamp(), &response);
            }
            Route::Elsewhere(location, slot) => {
                let response = context.wrong_shard(location, slot);
                self.count_answered(context, op, &response);
                self.encode_reply(request_id, &Reply::Response(response));
            }
            Route::Core(core_id) => {
                let pending = context.forward(core_id, body);
                self.await_forward(pending, asked, index, forwarded, handoff);
            }
            Route::Split => {
                let pending = context.split(now_ms, request);
                self.await_forward(pending, asked, index, forwarded, handoff);
            }
            Route::AfterLeaseCheck(home) => {
                let pending = context.apply_after_lease_check(home, body);
                self.await_forward(pending, asked, index, forwarded, handoff);
            }
            Route::Revoke => {
                let pending = context.revoke_and_wait(body);
                self.await_forward(pending, asked, index, forwarded, handoff);
            }
            Route::Lock => {
                let pending = context.lock_and_wait(body);
                self.await_forward(pending, asked, index, forwarded, handoff);
            }
        }
        true
    }

    /// Counts a request answered in this batch (its latency is counted with the batch's),
    /// and its error if `response` is one.
    fn count_answered(&mut self, context: &CoreContext, op: Op, response: &Response) {
        self.answered.push(op);
        if let Response::Error(reply) = response {
            context
                .metrics
                .borrow_mut()
                .requests
                .count_error(op, reply.code);
        }
    }

    /// Waits for another core's reply in a task of its own and hands it back to the loop.
    fn await_forward(
        &mut self,
        pending: PendingReply,
        asked: Asked,
        index: usize,
        forwarded: &Rc<RefCell<Vec<Forwarded>>>,
        handoff: &Handoff,
    ) {
        self.forwards_in_flight += 1;
        let forwarded = forwarded.clone();
        let notify = handoff.notify.clone();
        let generation = self.generation;
        let Asked {
            request_id,
            op,
            started,
        } = asked;
        glommio::spawn_local(async move {
            let reply = pending.await;
            forwarded.borrow_mut().push(Forwarded {
                index,
                generation,
                request_id,
                reply,
                op,
                started,
            });
            notify.notify();
        })
        .detach();
    }

    /// Frames one reply. A reply over the frame limit is replaced by a `TooLarge` error.
    fn encode_reply(&mut self, request_id: u64, reply: &Reply) {
        match reply {
            Reply::Body(body) => {
                let encoded = codec::encode_frame_with_body(
                    &mut self.write_buffer,
                    FrameKind::Response,
                    request_id,
                    body,
                );
                if let Err(protocol_error) = encoded {
                    refuse_reply(&mut self.write_buffer, request_id, &protocol_error);
                }
            }
            Reply::Response(response) => self.encode_response(request_id, response),
        }
    }

    /// Frames a response that reflects no single shard (an error about the request itself,
    /// a batch merged from several cores).
    fn encode_response(&mut self, request_id: u64, response: &Response) {
        encode_response_into(&mut self.write_buffer, request_id, None, response);
    }

    /// Frames a response this core's shard produced, stamped with the shard's revision now.
    fn encode_stamped(&mut self, request_id: u64, stamp: ShardStamp, response: &Response) {
        encode_response_into(&mut self.write_buffer, request_id, Some(stamp), response);
    }

    /// Opens a watch named by its request id, within the connection's limit.
    fn open_watch(
        &mut self,
        context: &CoreContext,
        now_ms: u64,
        request_id: u64,
        watch: &ArchivedWatch,
    ) {
        let watches_max = context.config.watchers_per_connection_max;
        let refusal = if self.watches.len() >= watches_max {
            Some(error(
                ErrorCode::Overloaded,
                format!(
                    "this connection already has {watches_max} watches \
                     (watchers_per_connection_max)"
                ),
            ))
        } else if self
            .watches
            .iter()
            .any(|stream| stream.watch_id == request_id)
        {
            Some(error(
                ErrorCode::InvalidArgument,
                format!("request id {request_id} already names a watch on this connection"),
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.encode_response(request_id, &refusal);
            return;
        }
        match watch_stream::open(context, now_ms, Some(request_id), watch) {
            Ok((stream, watching)) => {
                self.encode_stamped(request_id, context.stamp(), &watching);
                if let Some(due) = stream.progress_due_ms() {
                    context
                        .watch
                        .progress_due_ms
                        .set(context.watch.progress_due_ms.get().min(due));
                }
                self.watches.push(stream);
            }
            Err(refusal) => self.encode_stamped(request_id, context.stamp(), &refusal),
        }
    }

    /// Ends the watch named `watch_id`; whether it existed.
    fn close_watch(&mut self, context: &CoreContext, watch_id: u64) -> bool {
        let Some(position) = self
            .watches
            .iter()
            .position(|stream| stream.watch_id == watch_id)
        else {
            return false;
        };
        let stream = self.watches.swap_remove(position);
        context
            .shard
            .borrow_mut()
            .watch_hub()
            .unwatch(stream.hub_id);
        true
    }

    /// Moves what this connection's watchers have queued into the write buffer, as far as
    /// the buffer's limit allows; the rest waits in the hub (which cancels a watcher that
    /// falls too far behind).
    fn pump_watches(&mut self, context: &CoreContext, now_ms: u64) {
        let durable = watch_stream::deliverable_revision(context);
        let buffer_max = context.config.connection_write_buffer_bytes_max;
        let sending = self.sending.len() - self.sent;
        let write_buffer = &mut self.write_buffer;
        let mut shard = context.shard.borrow_mut();
        let hub = shard.watch_hub();
        let mut due_min = context.watch.progress_due_ms.get();
        let mut encoded = context.watch.encoded.borrow_mut();
        self.watches.retain_mut(|stream| {
            let room = buffer_max.saturating_sub(write_buffer.len() + sending);
            let mut emit = PushEmit {
                buffer: write_buffer,
                watch_id: stream.watch_id,
            };
            let pumped = stream.pump(hub, now_ms, room, durable, &mut encoded, &mut emit);
            if let Some(due) = stream.progress_due_ms() {
                due_min = due_min.min(due);
            }
            pumped != Pumped::Ended
        });
        // The first stream gets the room first: rotate, so none starves behind the others.
        if !self.watches.is_empty() {
            self.watches.rotate_left(1);
        }
        context.watch.progress_due_ms.set(due_min);
    }

    /// Removes `size` processed bytes from the front, keeping the rest aligned at offset 0.
    fn consume(&mut self, size: usize) {
        assert!(
            size <= self.filled,
            "consume {size} of {} bytes",
            self.filled
        );
        assert!(!self.is_receiving, "compacting under a receive in flight");
        self.read_buffer.copy_within(size..self.filled, 0);
        self.filled -= size;
    }

    /// Makes sure the next receive has room: grows the buffer to hold the frame being
    /// received (up to one maximal frame), and shrinks it back once a large frame is gone.
    fn make_room(&mut self) {
        assert!(!self.is_receiving, "resizing under a receive in flight");
        let needed = match codec::frame_size_needed(&self.read_buffer[..self.filled]) {
            Some(frame_size) => frame_size.max(READ_BUFFER_SIZE),
            None => READ_BUFFER_SIZE,
        };
        assert!(
            needed <= FRAME_SIZE_MAX.max(READ_BUFFER_SIZE),
            "needed={needed}"
        );
        if needed > self.read_buffer.len() {
            self.read_buffer.resize(needed, 0);
        } else if self.read_buffer.len() > READ_BUFFER_SIZE && self.filled <= READ_BUFFER_SIZE {
            self.read_buffer.resize(READ_BUFFER_SIZE, 0);
            self.read_buffer.shrink_to_fit();
        }
        debug_assert!(self.read_buffer.len() > self.filled || self.filled < FRAME_HEADER_SIZE);
    }

    /// On shutdown: answers the buffered frames and whatever the socket already holds with
    /// `ShuttingDown` (reading without waiting), then marks the connection to close. Returns
    /// whether a limit held frames back for the next pass.
    fn answer_for_shutdown(
        &mut self,
        context: &Rc<CoreContext>,
        now_ms: u64,
        started: Instant,
        forwarded: &Rc<RefCell<Vec<Forwarded>>>,
        handoff: &Handoff,
    ) -> bool {
        if self.close_reason.is_some() {
            return false;
        }
        loop {
            // While stopping nothing is routed, so nothing is forwarded (index unused).
            let is_held_back =
                self.process(context, now_ms, started, forwarded, handoff, usize::MAX);
            // Counted at once: this loop reads until the socket is empty.
            let latency_us = elapsed_us(started, Instant::now());
            let mut metrics = context.metrics.borrow_mut();
            for op in self.answered.drain(..) {
                metrics.requests.record(op, latency_us, 1);
            }
            drop(metrics);
            if is_held_back || self.is_paused(context) {
                return true;
            }
            if self.close_reason.is_some() || !self.receive_available() {
                break;
            }
        }
        self.close_reason.get_or_insert("server stopping");
        false
    }

    /// Reads what the socket holds now, without waiting; whether anything arrived.
    fn receive_available(&mut self) -> bool {
        self.make_room();
        let space = &mut self.read_buffer[self.filled..];
        if space.is_empty() {
            return false;
        }
        // SAFETY: a plain non-blocking recv into memory this connection owns; no ring receive
        // is in flight (the caller checked).
        let received = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                space.as_mut_ptr().cast(),
                space.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(received) {
            Ok(size) if size > 0 => {
                self.filled += size;
                true
            }
            _ => false,
        }
    }
}

/// Frames a watch's pushes into a connection's write buffer, under the watch's id.
struct PushEmit<'a> {
    buffer: &'a mut FrameBuffer,
    watch_id: u64,
}

impl watch_stream::Emit for PushEmit<'_> {
    fn response(&mut self, response: &Response) {
        // A push carries its own revisions.
        encode_response_into(self.buffer, self.watch_id, None, response);
    }

    fn body(&mut self, body: &[u8]) {
        let framed =
            codec::encode_frame_with_body(self.buffer, FrameKind::Response, self.watch_id, body);
        if let Err(protocol_error) = framed {
            refuse_reply(self.buffer, self.watch_id, &protocol_error);
        }
    }
}

/// Frames `response` into `buffer`; one over the frame limit is replaced by a `TooLarge`
/// error.
fn encode_response_into(
    buffer: &mut FrameBuffer,
    request_id: u64,
    stamp: Option<ShardStamp>,
    response: &Response,
) {
    if let Err(protocol_error) = codec::encode_reply(buffer, request_id, stamp, response) {
        refuse_reply(buffer, request_id, &protocol_error);
    }
}

fn refuse_reply(buffer: &mut FrameBuffer, request_id: u64, protocol_error: &ProtocolError) {
    let refusal: Response = error(
        protocol_error.code(),
        format!("reply refused: {protocol_error}"),
    );
    // An error reply is small; it always fits in a frame.
    let refused = codec::encode_response(buffer, request_id, &refusal);
    debug_assert!(refused.is_ok());
}
