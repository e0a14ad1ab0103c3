//! Pieces shared by the workloads: connection bookkeeping and phase control.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Counts connection attempts of a workload and keeps the first error.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    connected: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Progress {
    /// One more established connection.
    pub(crate) fn connected(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    /// One more failed connection attempt.
    pub(crate) fn failed(&self, err: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(format!("{err:#}"));
        }
    }

    /// `(connected, failed)` so far.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (
            self.connected.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// The first error message, if any.
    pub(crate) fn first_error(&self) -> Option<String> {
        self.first_error.lock().clone()
    }

    /// Waits (polling) until `n` attempts have finished or `timeout` passes.
    pub(crate) async fn wait_for(&self, n: usize, timeout: Duration) -> (usize, usize) {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, failed) = self.counts();
            if ok + failed >= n || Instant::now() >= deadline {
                return (ok, failed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Phases of a closed-loop workload, broadcast to all connection tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Connecting; nothing is sent yet.
    Connect,
    /// Warm-up probes that prove every route works before measuring.
    Probe,
    /// The measured window: send until the deadline.
    Run,
    /// Stop sending, keep receiving what is still in flight.
    Drain,
    /// Close everything.
    Shutdown,
}

/// Waits (polling) until `done()` is true or `timeout` passes; returns
/// whether it became true.
pub(crate) async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Builds a path for client `i`: substitutes `{i}` when present, else for a
/// path without a query appends `?id=i`, else appends `&id=i`.
pub(crate) fn client_path(template: &str, i: usize) -> String {
    if template.contains("{i}") {
        template.replace("{i}", &i.to_string())
    } else if template.contains('?') {
        format!("{template}&id={i}")
    } else {
        format!("{template}?id={i}")
    }
}

#[cfg(test)]
mod tests {
    use super::client_path;

    #[test]
    fn builds_client_paths() {
        assert_eq!(client_path("/ws", 3), "/ws?id=3");
        assert_eq!(client_path("/ws?x=1", 3), "/ws?x=1&id=3");
        assert_eq!(client_path("/ws?id=u{i}", 3), "/ws?id=u3");
    }
}
