//! Deferred wake-ups: while a connection handles the messages of one read
//! at once, the connections it queues frames to are woken when it is done
//! with them, not after every message.
//!
//! Why: a relay message queued to a recipient wakes the recipient's task.
//! Woken at once, that task often runs on the other worker thread straight
//! away, takes the one frame queued, and writes it with one system call;
//! the next message of the same read then wakes it again. Deferred to the
//! end of the sender's batch, the recipient takes every frame of the batch
//! in one go and writes them with one `send(2)`. Measured with
//! `tests/syscalls.rs`, 50 messages per read, each to the same 100
//! receivers: 550 socket calls per batch with a wake-up per message,
//! 103–130 deferred (about one `send(2)` per receiver per batch).
//!
//! The wakers wait in a per-thread list. It is filled only inside
//! [`deferring`], a synchronous scope (a handler's
//! [`on_message_now`](crate::Handler::on_message_now)), so no other task
//! adds to it, and it is emptied by [`flush`], which the connection task
//! calls before it can wait for anything: before an awaited handler call,
//! before yielding to the scheduler, and whenever it looks for its next
//! event. A flush by any task on the thread wakes every waker listed, so a
//! missed flush delays a wake-up, it never loses one.

use std::cell::{Cell, RefCell};
use std::task::Waker;

thread_local! {
    /// Set while a [`deferring`] scope runs on this thread.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// Wakers held back until the next [`flush`]. Keeps its capacity: a
    /// few pointers per worker thread.
    static DEFERRED: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with wake-ups deferred: a [`wake`] inside it is held until the
/// next [`flush`] on this thread.
pub(crate) fn deferring<R>(f: impl FnOnce() -> R) -> R {
    /// Ends the scope even if `f` unwinds.
    struct Scope {
        outer: bool,
    }
    impl Drop for Scope {
        fn drop(&mut self) {
            DEFERRING.set(self.outer);
        }
    }
    let _scope = Scope {
        outer: DEFERRING.replace(true),
    };
    f()
}

/// Wakes `waker` now, or at the next [`flush`] inside a [`deferring`]
/// scope.
pub(crate) fn wake(waker: Waker) {
    if DEFERRING.get() {
        DEFERRED.with_borrow_mut(|deferred| deferred.push(waker));
    } else {
        waker.wake();
    }
}

/// Wakes every waker deferred on this thread.
pub(crate) fn flush() {
    loop {
        // Taken one at a time, outside the borrow: waking runs the
        // scheduler's code, which must not find the list borrowed.
        let Some(waker) = DEFERRED.with_borrow_mut(Vec::pop) else {
            return;
        };
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_inside_a_scope_wait_for_the_flush() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let woken = || counter.0.load(Ordering::SeqCst);
        wake(Waker::from(Arc::clone(&counter)));
        assert_eq!(woken(), 1, "outside a scope: at once");
        deferring(|| {
            wake(Waker::from(Arc::clone(&counter)));
            wake(Waker::from(Arc::clone(&counter)));
        });
        assert_eq!(woken(), 1, "deferred until the flush");
        flush();
        assert_eq!(woken(), 3);
        flush();
        assert_eq!(woken(), 3, "each waker once");
    }

    #[test]
    fn a_panic_in_the_scope_ends_it() {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let caught = std::panic::catch_unwind(|| deferring(|| panic!("in the scope")));
        assert!(caught.is_err());
        wake(Waker::from(Arc::clone(&counter)));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "not deferred any more");
    }
}
