//! One task per presence owner that fires its jobs (pending leaves, window
//! flushes) when they are due. A heap rather than a sleeping task per job:
//! a mass disconnect schedules one pending leave per member, and 100,000
//! sleeping tasks would cost tens of megabytes; a heap entry costs the job
//! plus 24 bytes.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the task sleeps with nothing scheduled before it checks that
/// its owner still exists (so that a dropped backend's task ends).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What owns a [`Timers`] and does its jobs.
pub(crate) trait Fire: Send + Sync + 'static {
    type Job: Send + 'static;
    fn timers(&self) -> &Timers<Self::Job>;
    /// Does `job`, which is due.
    fn fire(&self, job: Self::Job);
}

/// Jobs by due time, and whether the task that fires them runs.
pub(crate) struct Timers<J> {
    queue: Mutex<Queue<J>>,
    wake: Arc<Notify>,
}

struct Queue<J> {
    heap: BinaryHeap<Reverse<Due<J>>>,
    next_seq: u64,
    running: bool,
}

struct Due<J> {
    at: Instant,
    seq: u64,
    job: J,
}

impl<J> PartialEq for Due<J> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<J> Eq for Due<J> {}
impl<J> PartialOrd for Due<J> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<J> Ord for Due<J> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<J: Send + 'static> Timers<J> {
    pub(crate) fn new() -> Self {
        Self {
            queue: Mutex::new(Queue {
                heap: BinaryHeap::new(),
                next_seq: 0,
                running: false,
            }),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Has `owner` fire `job` at `at`; starts the task on the first call
    /// made within a Tokio runtime.
    pub(crate) fn schedule<O: Fire<Job = J>>(&self, owner: &Weak<O>, at: Instant, job: J) {
        let mut queue = self.queue.lock();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let earliest = queue.heap.peek().is_none_or(|Reverse(head)| at < head.at);
        queue.heap.push(Reverse(Due { at, seq, job }));
        if !queue.running {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                queue.running = true;
                runtime.spawn(drive(owner.clone()));
            }
        } else if earliest {
            self.wake.notify_one();
        }
    }

    /// Every job due at `now`, earliest first.
    fn take_due(&self, now: Instant) -> Vec<J> {
        let mut queue = self.queue.lock();
        let mut due = Vec::new();
        while queue
            .heap
            .peek()
            .is_some_and(|Reverse(head)| head.at <= now)
        {
            if let Some(Reverse(head)) = queue.heap.pop() {
                due.push(head.job);
            }
        }
        due
    }

    fn next_at(&self) -> Option<Instant> {
        self.queue.lock().heap.peek().map(|Reverse(head)| head.at)
    }

    /// Jobs waiting (for tests and metrics).
    pub(crate) fn len(&self) -> usize {
        self.queue.lock().heap.len()
    }
}

/// The task: fires due jobs, sleeps until the next or a wake-up, and ends
/// when its owner is gone. Holds only a weak reference while it sleeps.
async fn drive<O: Fire>(owner: Weak<O>) {
    loop {
        let (wake, next) = {
            let Some(owner) = owner.upgrade() else {
                return;
            };
            let timers = owner.timers();
            for job in timers.take_due(Instant::now()) {
                owner.fire(job);
            }
            (Arc::clone(&timers.wake), timers.next_at())
        };
        let until = next.unwrap_or_else(|| Instant::now() + IDLE_CHECK);
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = wake.notified() => {}
        }
    }
}
