//! Listeners and the accept loop.
//!
//! The WebSocket listener speaks HTTP/1.1: `GET /v1/stream` with an upgrade becomes a session;
//! anything else gets a plain HTTP answer. Shutdown stops accepting, lets running sessions
//! drain (they send their last finals and close with 1001) for the grace period, then returns.

mod admission;
mod auth;
mod http;
mod observe;
mod session;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use pipeline::SttEngine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;

pub use observe::install_recorder;

/// What every connection task shares.
pub(crate) struct Shared {
    pub settings: Settings,
    pub engine: Arc<dyn SttEngine>,
    /// Cancelled when shutdown begins: sessions drain, new ones are refused.
    pub draining: CancellationToken,
    pub tracker: TaskTracker,
    pub ready: AtomicBool,
    pub admission: Arc<admission::Admission>,
    pub auth: auth::Auth,
}

/// A voxflow server bound to its listeners.
pub struct Server {
    listener: TcpListener,
    metrics_listener: TcpListener,
    settings: Settings,
    engine: Arc<dyn SttEngine>,
}

impl Server {
    /// Bind both listeners from `settings`.
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn bind(settings: Settings, engine: Arc<dyn SttEngine>) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on server.listen = {}", settings.listen))?;
        let metrics_listener = TcpListener::bind(settings.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on metrics.listen = {}",
                    settings.metrics_listen
                )
            })?;
        Ok(Server::from_listeners(
            settings,
            engine,
            listener,
            metrics_listener,
        ))
    }

    /// Use listeners the caller bound (tests bind port 0).
    pub fn from_listeners(
        settings: Settings,
        engine: Arc<dyn SttEngine>,
        listener: TcpListener,
        metrics_listener: TcpListener,
    ) -> Server {
        Server {
            listener,
            metrics_listener,
            settings,
            engine,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// Serve until `shutdown` resolves, then drain within the grace period.
    ///
    /// # Errors
    /// When a key or certificate file cannot be loaded, or the listener fails for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            listener,
            metrics_listener,
            settings,
            engine,
        } = self;
        let auth = auth::Auth::load(&settings.auth)?;
        let certs = settings
            .tls
            .as_ref()
            .map(|tls| Ok::<_, anyhow::Error>((tls::CertStore::load(tls)?, tls.reload_interval_ms)))
            .transpose()?;
        let acceptor = certs
            .as_ref()
            .map(|(store, _)| tls::acceptor(Arc::clone(store)))
            .transpose()?;
        let shared = Arc::new(Shared {
            admission: admission::Admission::new(settings.limits),
            auth,
            settings,
            engine,
            draining: CancellationToken::new(),
            tracker: TaskTracker::new(),
            ready: AtomicBool::new(true),
        });
        if let Some((store, interval_ms)) = certs {
            tokio::spawn(tls::watch(
                store,
                std::time::Duration::from_millis(interval_ms),
                shared.draining.clone(),
            ));
        }
        let scheme = if acceptor.is_some() { "wss" } else { "ws" };
        let handle = install_recorder();
        let observer = tokio::spawn(observe::serve(
            metrics_listener,
            handle,
            Arc::clone(&shared),
        ));
        tracing::info!(
            listen = %listener.local_addr()?,
            engine = shared.engine.name(),
            "voxflow is serving {scheme}://{}/v1/stream",
            listener.local_addr()?
        );
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let shared2 = Arc::clone(&shared);
                        match &acceptor {
                            None => {
                                shared.tracker.spawn(http::serve_connection(stream, peer, shared2));
                            }
                            Some(acceptor) => {
                                shared.tracker.spawn(http::serve_tls(acceptor.clone(), stream, peer, shared2));
                            }
                        }
                    }
                    // Out of file descriptors and the like: keep serving the sessions we have.
                    Err(error) => {
                        tracing::warn!(%error, "Accept failed.");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        shared.ready.store(false, Ordering::Relaxed);
        shared.draining.cancel();
        shared.tracker.close();
        let sessions = shared.tracker.len();
        tracing::info!(
            sessions,
            grace_ms = shared.settings.grace_period.as_millis() as u64,
            "Draining."
        );
        if tokio::time::timeout(shared.settings.grace_period, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = shared.tracker.len(),
                "Grace period over; cutting the remaining sessions."
            );
        }
        observer.abort();
        Ok(())
    }
}

/// Build the engine `settings.stt.engine` names.
///
/// # Errors
/// When the engine's configuration is unusable.
pub fn engine(settings: &Settings) -> anyhow::Result<Arc<dyn SttEngine>> {
    match settings.stt.engine {
        stages::stt::config::EngineKind::Google => Ok(Arc::new(
            stages::stt::google::GoogleEngine::new(&settings.stt.google)?,
        )),
        stages::stt::config::EngineKind::Whisper => {
            Ok(Arc::new(stages::stt::whisper::WhisperEngine::new(
                &settings.stt.whisper,
                settings.stt.sample_rate_hz,
            )?))
        }
    }
}

/// Bind from `settings` and serve until `shutdown`.
///
/// # Errors
/// As [`Server::bind`] and [`Server::run`].
pub async fn run(
    settings: Settings,
    engine: Arc<dyn SttEngine>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    Server::bind(settings, engine).await?.run(shutdown).await
}
