//! Binds the listen address: the first of its resolved addresses that
//! this machine has. An address that is taken or not allowed stops the
//! server (exit code 3) rather than falling through to the next one, so
//! `localhost:8080` never ends up on a different address family than
//! another server already on it.

use std::io::ErrorKind;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Listen;

/// The listen address cannot be bound; the binary exits with code 3.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}{from_name}")]
pub(crate) struct BindError {
    addr: SocketAddr,
    /// ` (listen = NAME:PORT)` when `listen` was a name, else empty.
    from_name: String,
    #[source]
    source: std::io::Error,
}

/// Binds the first address of `listen` that works, in resolution order,
/// and says which when `listen` is a name.
pub(crate) async fn bind(listen: &Listen) -> Result<TcpListener, BindError> {
    let from_name = if listen.is_name() {
        format!(" (listen = {})", listen.written)
    } else {
        String::new()
    };
    if listen.is_name() {
        tracing::info!(
            listen = %listen.written,
            addresses = crate::logging::json(&listen.addrs),
            "resolved the listen address"
        );
    }
    let mut last = None;
    for (i, &addr) in listen.addrs.iter().enumerate() {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            // Taken or forbidden: the next address would be a surprise.
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::AddrInUse | ErrorKind::PermissionDenied
                ) =>
            {
                return Err(BindError {
                    addr,
                    from_name,
                    source: err,
                });
            }
            // Not on this machine (say ::1 with IPv6 off): try the next.
            Err(err) => {
                if i + 1 < listen.addrs.len() {
                    tracing::warn!(%addr, %err, "cannot bind this address of the listen name; trying the next");
                }
                last = Some((addr, err));
            }
        }
    }
    let (addr, source) = last.unwrap_or_else(|| {
        (
            SocketAddr::from(([127, 0, 0, 1], listen.written.port)),
            std::io::Error::new(ErrorKind::InvalidInput, "no address to bind"),
        )
    });
    Err(BindError {
        addr,
        from_name,
        source,
    })
}
