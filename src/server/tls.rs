//! `wss://`: rustls (ring provider, TLS 1.2 and 1.3) in front of the HTTP connection, with a
//! certificate that can be replaced while the server runs.
//!
//! The certificate and key are read from PEM files. A background task checks their
//! modification times every `reload_interval_ms` (and reloads at once on SIGHUP); a pair that
//! loads replaces the served one for new handshakes. Connections already established keep
//! their session keys, so no session is dropped. A pair that does not load is logged and the
//! old one stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::Context as _;
use rustls::crypto::ring::{default_provider, sign::any_supported_type};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// The certificate served now; swapped whole on reload.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

impl CertStore {
    /// Load the pair now.
    ///
    /// # Errors
    /// Either file unreadable, not PEM, or a key rustls cannot sign with.
    pub fn load(config: &TlsConfig) -> anyhow::Result<Arc<CertStore>> {
        let cert_path = PathBuf::from(&config.cert_path);
        let key_path = PathBuf::from(&config.key_path);
        let current = RwLock::new(Arc::new(load_pair(&cert_path, &key_path)?));
        Ok(Arc::new(CertStore {
            cert_path,
            key_path,
            current,
        }))
    }

    /// Load the files again; on failure keep serving the old pair.
    pub fn reload(&self) -> anyhow::Result<()> {
        let pair = load_pair(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(())
    }

    fn mtimes(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (mtime(&self.cert_path), mtime(&self.key_path))
    }
}

fn load_pair(cert_path: &Path, key_path: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .with_context(|| format!("cannot read server.tls.cert_path {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert_path {} is not PEM", cert_path.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "server.tls.cert_path {} holds no certificate",
        cert_path.display()
    );
    // The error text never includes key material.
    let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
        format!(
            "server.tls.key_path {} holds no readable private key",
            key_path.display()
        )
    })?;
    let signing_key = any_supported_type(&key).with_context(|| {
        format!(
            "server.tls.key_path {}: unsupported key type",
            key_path.display()
        )
    })?;
    let pair = CertifiedKey::new(chain, signing_key);
    // A rotation caught between writing the two files must not serve a mismatched pair.
    pair.keys_match().with_context(|| {
        format!(
            "server.tls: the key in {} does not match the certificate in {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok(pair)
}

/// The acceptor for `store`: TLS 1.2+, no client certificates, HTTP/1.1 over ALPN.
///
/// # Errors
/// When the ring provider refuses the protocol versions (it does not).
pub fn acceptor(store: Arc<CertStore>) -> anyhow::Result<TlsAcceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Reload on file change (polled every `interval`) or SIGHUP, until `stop`. The SIGHUP handler
/// is installed when this is called, before the returned future first runs.
pub fn watch(
    store: Arc<CertStore>,
    interval: std::time::Duration,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    async move {
        let mut seen = store.mtimes();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => false,
                () = hup => true,
            };
            let now = store.mtimes();
            if !forced && now == seen {
                continue;
            }
            match store.reload() {
                Ok(()) => {
                    seen = now;
                    tracing::info!(cert = %store.cert_path.display(), "TLS certificate reloaded.");
                }
                // Half-written files during a rotation fail here; the next tick tries again.
                Err(error) => {
                    tracing::warn!(%error, "TLS certificate reload failed; keeping the old one.")
                }
            }
        }
    }
}
