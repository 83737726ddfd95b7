//! A bounded queue into one core that any thread may push to.
//!
//! This is the only way work crosses between threads: requests forwarded from another core,
//! calls from an embedded caller's threads (a tokio runtime, a blocking script), the admin
//! endpoint's metrics probes and the stop signal (closing the inbox) all arrive here. The owning core drains the whole queue on each
//! wake, so a burst costs one wake-up, not one per item.
//!
//! Wakers are plain `std::task::Waker`s: glommio lets other threads wake its tasks, which
//! costs an eventfd write when the core is parked.
//!
//! **Invariant:** the queue never holds more than `capacity` items; a push beyond it fails
//! with [`PushError::Full`] and the caller answers `Overloaded`.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

/// Why a push did not enqueue; the item is handed back.
#[derive(Debug)]
pub enum PushError<T> {
    /// The inbox holds `capacity` items already.
    Full(T),
    /// The inbox was closed: its core is stopping.
    Closed(T),
}

#[derive(Debug)]
struct InboxState<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    is_closed: bool,
}

/// A bounded multi-producer, single-consumer queue with an async receive.
#[derive(Debug)]
pub struct Inbox<T> {
    state: Mutex<InboxState<T>>,
    capacity: usize,
}

impl<T> Inbox<T> {
    /// An open inbox holding at most `capacity` items.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "inbox capacity must be positive");
        Self {
            state: Mutex::new(InboxState {
                queue: VecDeque::new(),
                waker: None,
                is_closed: false,
            }),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState<T>> {
        // A panic while holding this lock cannot leave the queue half-updated (every critical
        // section is a single push, swap or flag write), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enqueues `item` and wakes the consumer.
    ///
    /// # Errors
    /// The inbox is full or closed; the item is returned.
    pub fn push(&self, item: T) -> Result<(), PushError<T>> {
        let waker = {
            let mut state = self.lock();
            if state.is_closed {
                return Err(PushError::Closed(item));
            }
            if state.queue.len() >= self.capacity {
                return Err(PushError::Full(item));
            }
            state.queue.push_back(item);
            state.waker.take()
        };
        // Wake outside the lock so the consumer never contends with us for it.
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Enqueues `item` whatever the bound, and wakes the consumer: for control messages
    /// whose number is bounded by their cause (one per lease end and core, one metrics probe
    /// per core in flight), which must not be refused.
    ///
    /// # Errors
    /// The inbox is closed; the item is returned.
    pub fn push_control(&self, item: T) -> Result<(), PushError<T>> {
        let waker = {
            let mut state = self.lock();
            if state.is_closed {
                return Err(PushError::Closed(item));
            }
            state.queue.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Closes the inbox: later pushes fail, and the consumer sees the close once it has
    /// drained what was already queued.
    pub fn close(&self) {
        let waker = {
            let mut state = self.lock();
            state.is_closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether [`Inbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().is_closed
    }

    /// The most items the inbox holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items queued now (control messages included, so it may pass `capacity`).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until items are queued, then moves all of them into `batch` (which must be
    /// empty). Returns `false`, with `batch` empty, once the inbox is closed and drained.
    pub async fn receive_batch(&self, batch: &mut VecDeque<T>) -> bool {
        assert!(
            batch.is_empty(),
            "receive_batch needs an empty batch, len={}",
            batch.len()
        );
        poll_fn(|context| {
            let mut state = self.lock();
            if !state.queue.is_empty() {
                std::mem::swap(&mut state.queue, batch);
                return Poll::Ready(true);
            }
            if state.is_closed {
                return Poll::Ready(false);
            }
            state.waker = Some(context.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_respects_capacity_and_close() {
        let inbox = Inbox::new(2);
        assert!(inbox.push(1).is_ok());
        assert!(inbox.push(2).is_ok());
        assert!(matches!(inbox.push(3), Err(PushError::Full(3))));
        inbox.close();
        assert!(matches!(inbox.push(4), Err(PushError::Closed(4))));
        assert!(inbox.is_closed());
    }

    #[test]
    fn receive_drains_everything_then_reports_close() {
        let inbox = std::sync::Arc::new(Inbox::new(8));
        let producer = {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for item in 0..5 {
                    while inbox.push(item).is_err() {
                        std::thread::yield_now();
                    }
                }
                inbox.close();
            })
        };
        let received = futures_lite::future::block_on(async {
            let mut received = Vec::new();
            let mut batch = VecDeque::new();
            while inbox.receive_batch(&mut batch).await {
                received.extend(batch.drain(..));
            }
            received
        });
        producer.join().unwrap();
        assert_eq!(received, vec![0, 1, 2, 3, 4]);
    }
}
