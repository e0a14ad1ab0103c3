//! TLS for [`serve_with_options`](crate::serve_with_options): HTTPS and WSS
//! on the same port, with rustls, and certificate reload without dropping
//! connections.
//!
//! ```no_run
//! use switchboard::tls::Tls;
//! use switchboard::{Hub, Limits, ServeOptions};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = Tls::from_pem_files("/etc/switchboard/fullchain.pem", "/etc/switchboard/key.pem")?;
//! let hub = Hub::new(Limits::default());
//! let app = switchboard::app(hub.clone());
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
//! let options = ServeOptions { tls: Some(tls.clone()), ..ServeOptions::default() };
//! // Later, e.g. on SIGHUP after the certificate was renewed: new
//! // connections get the new certificate, open ones are not touched.
//! # let _reload = || tls.reload();
//! switchboard::serve_with_options(listener, app, hub, std::future::pending(), options).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

/// The stream of a TLS connection accepted by `serve`.
pub(crate) type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS certificate and key read from PEM files, reloadable.
///
/// Cloning shares the certificate: [`reload`](Self::reload) on any clone
/// changes what every new connection is served. TLS 1.2 and 1.3 with
/// rustls' safe defaults (the `ring` provider); ALPN offers `http/1.1`, the
/// protocol WebSockets are upgraded from.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    config: Arc<ServerConfig>,
}

/// Why a certificate or key cannot be used. The server keeps its current
/// certificate when a reload fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error(
        "{path} holds no PEM certificate: expected `-----BEGIN CERTIFICATE-----` blocks, the server's certificate first, then its chain"
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error(
        "{path} holds no PEM private key: expected `-----BEGIN PRIVATE KEY-----` (PKCS#8), `RSA PRIVATE KEY` or `EC PRIVATE KEY` ({reason})"
    )]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The key is of a kind rustls cannot sign with, or does not belong to
    /// the certificate.
    #[error("the key in {key} cannot serve the certificate in {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

impl Tls {
    /// Reads the certificate chain (`cert`: PEM, the server's certificate
    /// first) and its private key (`key`: PEM, PKCS#8, PKCS#1 or SEC1), and
    /// checks that they belong together.
    pub fn from_pem_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (cert.into(), key.into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = load(&provider, &cert_path, &key_path)?;
        let resolver = Arc::new(Resolver(RwLock::new(Arc::new(certified))));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Mismatch {
                cert: cert_path.clone(),
                key: key_path.clone(),
                reason: err.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            inner: Arc::new(Inner {
                cert_path,
                key_path,
                provider,
                resolver,
                config: Arc::new(config),
            }),
        })
    }

    /// Reads both files again and serves the new certificate to every new
    /// connection; connections already open keep theirs. On error nothing
    /// changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let inner = &self.inner;
        let certified = load(&inner.provider, &inner.cert_path, &inner.key_path)?;
        *inner.resolver.0.write() = Arc::new(certified);
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.inner.cert_path
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.inner.key_path
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.inner.config))
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.inner.cert_path)
            .field("key", &self.inner.key_path)
            .finish()
    }
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read()))
    }
}

fn load(provider: &CryptoProvider, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::NoKey {
        path: key.to_owned(),
        reason: err.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|err| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: err.to_string(),
    })
}
