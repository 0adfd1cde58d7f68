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
use hyper_util::rt::TokioIo;
use pipeline::metrics::sessions;
use pipeline::protocol::StartFields;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::Shared;

pub const STREAM_PATH: &str = "/v1/stream";

/// The demo page: microphone capture, live partials and finals, session stats.
const DEMO_PAGE: &str = include_str!("demo/index.html");

pub(super) async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(route(request, peer, shared)) }
    });
    let connection = http1::Builder::new()
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(error) = connection.await {
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
    let query = match parse_query(request.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => {
            sessions::refused("bad_request");
            return text(StatusCode::BAD_REQUEST, &format!("{message}\n"));
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let config = WebSocketConfig::default()
        .max_message_size(Some(shared.settings.max_message_bytes))
        .max_frame_size(Some(shared.settings.max_message_bytes))
        // Small write buffers: a slow reader must push back, not make the server buffer for it.
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024);
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                super::session::run(socket, query, peer, shared).await;
            }
            Err(error) => tracing::debug!(%peer, %error, "Upgrade failed."),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
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
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    Ok(fields)
}
