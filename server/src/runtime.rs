//! The thin layer between Tessera and glommio: a per-core stop signal and the helpers that
//! race work against it. Keeping runtime calls here and in `net/` means the runtime can be
//! replaced without touching shard logic (glommio 0.9 is its last release).

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::{Poll, Waker};

#[derive(Debug, Default)]
struct SignalState {
    is_fired: bool,
    wakers: Vec<Waker>,
}

/// A one-shot, core-local broadcast: once fired, every current and future waiter completes.
/// Used to tell a core's accept loop, connections and timers to stop.
#[derive(Debug, Clone, Default)]
pub struct LocalSignal {
    state: Rc<RefCell<SignalState>>,
}

impl LocalSignal {
    /// An unfired signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal, waking every waiter. Firing twice is harmless.
    pub fn fire(&self) {
        let wakers = {
            let mut state = self.state.borrow_mut();
            state.is_fired = true;
            std::mem::take(&mut state.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.state.borrow().is_fired
    }

    /// Completes once the signal has fired.
    pub async fn wait(&self) {
        poll_fn(|context| {
            let mut state = self.state.borrow_mut();
            if state.is_fired {
                return Poll::Ready(());
            }
            // Waiters are few (one per connection and loop) and each registers once per wake,
            // so a linear check keeps the list from growing on spurious polls.
            if !state
                .wakers
                .iter()
                .any(|waker| waker.will_wake(context.waker()))
            {
                state.wakers.push(context.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }

    /// Runs `work` unless the signal fires first; `None` if it did.
    ///
    /// `work` is polled first, so a result that is already available is never lost to the
    /// signal. Only use this with futures that are safe to drop midway (glommio socket reads
    /// are: they wait for readiness and then read with a plain syscall).
    pub async fn unless_fired<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(work.await) }, async {
            self.wait().await;
            None
        })
        .await
    }
}

/// A core-local, re-armable wake-up: [`LocalNotify::notify`] makes the next (or current)
/// [`LocalNotify::notified`] complete once. Notifications before anyone waits are not lost;
/// several of them collapse into one.
#[derive(Debug, Clone, Default)]
pub struct LocalNotify {
    state: Rc<RefCell<NotifyState>>,
}

#[derive(Debug, Default)]
struct NotifyState {
    is_notified: bool,
    waker: Option<Waker>,
}

impl LocalNotify {
    /// A notify with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `other` is this same notify (a clone of it).
    pub fn is_same(&self, other: &LocalNotify) -> bool {
        Rc::ptr_eq(&self.state, &other.state)
    }

    /// Wakes the waiter, or the next one to wait.
    pub fn notify(&self) {
        let waker = {
            let mut state = self.state.borrow_mut();
            state.is_notified = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Completes once a notification is pending, consuming it. Safe to drop midway.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|context| {
            let mut state = self.state.borrow_mut();
            if state.is_notified {
                state.is_notified = false;
                return Poll::Ready(());
            }
            state.waker = Some(context.waker().clone());
            Poll::Pending
        })
    }
}
