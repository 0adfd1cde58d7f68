//! HTTP/1.1 on the WebSocket listener: the upgrade to a session, and plain answers otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use pipeline::metrics::sessions;
use pipeline::protocol::StartFields;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::Shared;

pub const STREAM_PATH: &str = "/v1/stream";

/// The demo page: microphone capture, live partials and finals, session stats.
const DEMO_PAGE: &str = include_str!("demo/index.html");

/// Complete the TLS handshake within the handshake timeout, then serve HTTP on it.
pub(super) async fn serve_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let limit = shared.settings.limits.handshake_timeout;
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, peer, shared).await,
        Ok(Err(error)) => {
            sessions::refused("tls");
            tracing::debug!(%peer, %error, "TLS handshake failed.");
        }
        Err(_) => {
            sessions::refused("handshake_timeout");
            tracing::debug!(%peer, "TLS handshake timed out.");
        }
    }
}

/// HTTP/1.1 on one connection. Each request head must arrive within the handshake timeout
/// (slowloris), so no connection idles here for longer.
pub(super) async fn serve_connection<I>(io: I, peer: SocketAddr, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = shared.settings.limits.handshake_timeout;
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(route(request, peer, shared)) }
    });
    let connection = http1::Builder::new()
        .max_buf_size(64 * 1024)
        .timer(TokioTimer::new())
        .header_read_timeout(limit)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(error) = connection.await {
        if error.is_timeout() {
            sessions::refused("handshake_timeout");
        }
        tracing::debug!(%peer, %error, "HTTP connection ended with an error.");
    }
}

fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        STREAM_PATH => upgrade(request, peer, shared),
        "/" | "/index.html" => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::new(Bytes::from_static(DEMO_PAGE.as_bytes())))
            .expect("static response parts are valid"),
        _ => {
            sessions::refused("not_found");
            text(StatusCode::NOT_FOUND, "not found\n")
        }
    }
}

fn upgrade(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    if shared.draining.is_cancelled() {
        sessions::refused("draining");
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let headers = request.headers();
    let is_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true) = (key, is_upgrade, version_ok) else {
        sessions::refused("bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)\n",
        );
    };
    let raw_query = request.uri().query().unwrap_or("");
    let query = match parse_query(raw_query) {
        Ok(query) => query,
        Err(message) => {
            sessions::refused("bad_request");
            return text(StatusCode::BAD_REQUEST, &format!("{message}\n"));
        }
    };
    let grant = match shared.auth.check(request.headers(), raw_query) {
        Ok(grant) => grant,
        Err(failure) => {
            sessions::refused(failure.as_str());
            tracing::info!(%peer, reason = failure.as_str(), "Upgrade refused.");
            let status = if failure == super::auth::AuthFailure::Origin {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            let mut response = text(status, failure.message());
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
            }
            return response;
        }
    };
    let permit = match shared.admission.admit(peer.ip(), grant.quota.clone()) {
        Ok(permit) => permit,
        Err(refusal) => {
            sessions::refused(refusal.as_str());
            tracing::info!(%peer, reason = refusal.as_str(), "Upgrade refused: at a limit.");
            let status = if refusal == super::admission::Refusal::Capacity {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            let mut response = text(status, &format!("{}: retry later\n", refusal.as_str()));
            let retry_secs = shared
                .settings
                .limits
                .retry_after
                .as_millis()
                .div_ceil(1000);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                http::HeaderValue::from(retry_secs as u64),
            );
            return response;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let tracker = shared.tracker.clone();
    tracing::debug!(%peer, method = grant.method, key = grant.key_id.as_deref().unwrap_or(""), "Upgrade accepted.");
    tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (sink, source) =
                    super::session::split(TokioIo::new(upgraded), &shared.settings).await;
                // Boxed: the session's future is kilobytes; built inside this block it would
                // be laid out beside the upgrade's state instead of replacing it.
                Box::pin(super::session::run(sink, source, query, peer, shared)).await;
                drop(permit);
            }
            Err(error) => tracing::debug!(%peer, %error, "Upgrade failed."),
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid");
    if let Some(protocol) = grant.subprotocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// The `start` fields given as URL query parameters.
///
/// # Errors
/// An unknown key or a value of the wrong type, described for the client.
pub fn parse_query(query: &str) -> Result<StartFields, String> {
    let mut fields = StartFields::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{key} must be a number, got {v:?}"))
        };
        let flag = |v: &str| {
            v.parse::<bool>()
                .map_err(|_| format!("{key} must be true or false, got {v:?}"))
        };
        let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
        match key.as_ref() {
            "audio_id" => fields.audio_id = Some(value.into_owned()),
            "encoding" => fields.encoding = Some(value.into_owned()),
            "sample_rate_hertz" => fields.sample_rate_hertz = Some(number(&value)?),
            "audio_channel_count" => {
                fields.audio_channel_count =
                    Some(u16::try_from(number(&value)?).map_err(|e| e.to_string())?)
            }
            "language_code" => fields.language_code = Some(value.into_owned()),
            "alternative_language_codes" => fields.alternative_language_codes = Some(list(&value)),
            "model" => fields.model = Some(value.into_owned()),
            "interim_results" => fields.interim_results = Some(flag(&value)?),
            "enable_automatic_punctuation" => {
                fields.enable_automatic_punctuation = Some(flag(&value)?)
            }
            "profanity_filter" => fields.profanity_filter = Some(flag(&value)?),
            "enable_word_time_offsets" => fields.enable_word_time_offsets = Some(flag(&value)?),
            "phrase_hints" => fields.phrase_hints = Some(list(&value)),
            // A credential: read by `auth`, never echoed or logged.
            "token" => {}
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    Ok(fields)
}
