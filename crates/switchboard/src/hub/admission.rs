//! What a WebSocket connection holds to stay counted under the connection
//! limits: a permit of `limits.max_connections` and its IP's place under
//! `limits.max_connections_per_ip`, both given back when it is dropped.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::auth::IpGuard;

/// One permit of the `limits.max_connections` semaphore, in 8 bytes
/// (`OwnedSemaphorePermit` takes 16, and every byte a WebSocket holds is
/// paid once per connection).
pub(crate) struct CapPermit(Arc<Semaphore>);

impl CapPermit {
    /// Takes a permit, if one is left.
    pub(crate) fn try_acquire(cap: &Arc<Semaphore>) -> Option<Self> {
        cap.try_acquire().ok()?.forget();
        Some(Self(Arc::clone(cap)))
    }
}

impl Drop for CapPermit {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// What a WebSocket holds for its whole life to stay counted under the
/// limits: its place under `limits.max_connections` and under its IP's
/// `limits.max_connections_per_ip`.
#[derive(Default)]
pub(crate) struct Admission {
    _cap: Option<CapPermit>,
    _ip: Option<IpGuard>,
}

impl Admission {
    /// Holds `cap` and `ip` until dropped.
    pub(crate) fn new(cap: Option<CapPermit>, ip: Option<IpGuard>) -> Self {
        Self { _cap: cap, _ip: ip }
    }
}
