//! A core's own `io_uring` for socket I/O, woken through glommio.
//!
//! glommio 0.9 serves a socket read with a poll request per message and a `recv` system call
//! once it fires, and a write with a `send` system call; its rings use none of the newer setup
//! flags, so every completion makes the kernel interrupt the core's thread (and the peer's
//! `send` pays for that interrupt). Measured on the CI machine with the same load generator,
//! a glommio echo server cost more CPU per message than Redis with epoll (see
//! `docs/benchmarks.md`). This ring fixes both: receives and sends are `io_uring` operations
//! queued by the core and submitted together, one `io_uring_enter` per batch, and the ring is
//! set up single-issuer with deferred task work, so the kernel does completion work only when
//! the core asks for completions.
//!
//! glommio still runs the core: the executor, timers, the inbox and files. The ring signals an
//! eventfd when completions are pending; the core awaits that eventfd through glommio (a read
//! on a `BufferedFile`), so a core with nothing to do still parks in glommio's reactor.
//!
//! **Invariant:** a buffer passed to [`SocketRing::push_receive`] or
//! [`SocketRing::push_send`] stays valid and unmoved until its completion has been returned by
//! [`SocketRing::take_completions`]. The callers' safety comments say how they keep it.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use io_uring::{opcode, squeue, types, IoUring};

/// One completed operation: the token it was queued with and its result (bytes, or a negated
/// errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The caller's token.
    pub token: u64,
    /// Bytes transferred, or `-errno`.
    pub result: i32,
}

type WakeupRead = Pin<Box<dyn Future<Output = ()>>>;

/// A per-core `io_uring` for socket receives and sends.
pub struct SocketRing {
    ring: IoUring,
    /// Signalled by the kernel when completions are pending. Kept so the descriptor lives as
    /// long as the registration.
    _eventfd: OwnedFd,
    /// The same eventfd, read through glommio to park until it is signalled.
    wakeup_file: std::rc::Rc<glommio::io::BufferedFile>,
    /// The read in flight on `wakeup_file`, kept across waits so a signal is never consumed by
    /// a read that nobody polls.
    wakeup_read: Option<WakeupRead>,
    /// Operations queued or in the kernel whose completions have not been taken.
    in_flight_count: usize,
    /// Submission slots.
    capacity: usize,
}

impl std::fmt::Debug for SocketRing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SocketRing")
            .field("in_flight_count", &self.in_flight_count)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl SocketRing {
    /// A ring with room for `entries` operations in flight (rounded up to a power of two).
    /// Must be called on the core's thread, inside its glommio executor.
    ///
    /// # Errors
    /// The kernel refuses the ring or the eventfd.
    pub fn new(entries: u32) -> io::Result<Self> {
        let entries = entries.max(8).next_power_of_two();
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(entries.saturating_mul(2))
                    .build(entries)
            })?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let duplicate = eventfd.try_clone()?;
        // SAFETY: ownership of the duplicate moves into the glommio file, which closes it.
        let wakeup_file = unsafe {
            glommio::io::BufferedFile::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(duplicate))
        };
        Ok(Self {
            ring,
            _eventfd: eventfd,
            wakeup_file: std::rc::Rc::new(wakeup_file),
            wakeup_read: None,
            in_flight_count: 0,
            capacity: entries as usize,
        })
    }

    /// Operations whose completions have not been taken yet.
    pub fn in_flight_count(&self) -> usize {
        self.in_flight_count
    }

    /// Whether another operation can be queued.
    pub fn has_room(&self) -> bool {
        self.in_flight_count < self.capacity
    }

    /// Queues a receive of up to `length` bytes into `buffer` on `fd`.
    ///
    /// # Errors
    /// The ring is full.
    ///
    /// # Safety
    /// `buffer..buffer + length` must stay valid for writes, and unmoved, until this token's
    /// completion is taken.
    pub unsafe fn push_receive(
        &mut self,
        fd: RawFd,
        buffer: *mut u8,
        length: usize,
        token: u64,
    ) -> io::Result<()> {
        let length = u32::try_from(length).unwrap_or(u32::MAX);
        let entry = opcode::Recv::new(types::Fd(fd), buffer, length)
            .build()
            .user_data(token);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Queues a send of `length` bytes from `buffer` on `fd`.
    ///
    /// # Errors
    /// The ring is full.
    ///
    /// # Safety
    /// `buffer..buffer + length` must stay valid, and unmoved, until this token's completion
    /// is taken.
    pub unsafe fn push_send(
        &mut self,
        fd: RawFd,
        buffer: *const u8,
        length: usize,
        token: u64,
    ) -> io::Result<()> {
        let length = u32::try_from(length).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fd(fd), buffer, length)
            .build()
            .user_data(token);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) }
    }

    /// Queues a cancel of the operation queued with `target`; the target then completes
    /// (with what it has, or `-ECANCELED`) and this cancel completes under `token`.
    ///
    /// # Errors
    /// The ring is full.
    pub fn push_cancel(&mut self, target: u64, token: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target).build().user_data(token);
        // SAFETY: a cancel refers to no memory.
        unsafe { self.push(&entry) }
    }

    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        if !self.has_room() {
            return Err(io::Error::other(format!(
                "socket ring full ({} operations in flight)",
                self.capacity
            )));
        }
        // SAFETY: the caller guarantees the entry's buffer outlives its completion.
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            // The queue holds unsubmitted entries; hand them to the kernel and try again.
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(entry) }
                .map_err(|_| io::Error::other("socket ring submission queue full"))?;
        }
        self.in_flight_count += 1;
        Ok(())
    }

    /// Hands every queued operation to the kernel and lets it post the completions that are
    /// ready, without waiting.
    ///
    /// # Errors
    /// `io_uring_enter` failed for a reason other than an interruption.
    pub fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(0) {
            Ok(_) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Moves every posted completion into `out` (appending).
    pub fn take_completions(&mut self, out: &mut Vec<Completion>) {
        let before = out.len();
        out.extend(self.ring.completion().map(|entry| Completion {
            token: entry.user_data(),
            result: entry.result(),
        }));
        let taken = out.len() - before;
        assert!(
            taken <= self.in_flight_count,
            "taken={taken} in_flight={}",
            self.in_flight_count
        );
        self.in_flight_count -= taken;
    }

    /// Whether completions are waiting in the queue or as deferred kernel work.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().taskrun()
    }

    /// Completes when the kernel signals pending completions; usable in a select with other
    /// wake-up sources, and safe to drop midway (the read stays pending for the next wait).
    pub fn wait_signal(&mut self) -> WaitSignal<'_> {
        WaitSignal { ring: self }
    }
}

/// The future returned by [`SocketRing::wait_signal`].
pub struct WaitSignal<'a> {
    ring: &'a mut SocketRing,
}

impl Future for WaitSignal<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let ring = &mut *self.ring;
        let read = ring.wakeup_read.get_or_insert_with(|| {
            let file = ring.wakeup_file.clone();
            Box::pin(async move {
                let _ = file.read_at(0, 8).await;
            })
        });
        match read.as_mut().poll(context) {
            Poll::Ready(()) => {
                ring.wakeup_read = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
