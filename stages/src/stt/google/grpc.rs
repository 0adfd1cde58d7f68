//! The one gRPC call the engine makes, `StreamingRecognize`, straight on HTTP/2 (h2).
//!
//! Through tonic's channel, hyper piped a streaming request body into HTTP/2 from a task of its
//! own per stream: each 20 ms audio request went through a queue, woke that task and was encoded
//! there, ~9% of a loaded gateway's CPU (BENCHMARKS.md). Here the session's own task
//! frames each request into its final bytes and gives them to the HTTP/2 stream, which the
//! connection's task writes. Backpressure is hyper's: a request is sent while the stream has
//! flow-control capacity, so at most one request waits beyond the peer's window.
//!
//! Responses are gRPC length-prefixed protobuf messages; the call's status comes in the
//! trailers (or, for a call refused at once, in the response headers).

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
    StreamingRecognizeRequest, StreamingRecognizeResponse,
};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{sleep, timeout};
use tonic::{Code, Status};

use super::transport::Coalesced;

const STREAMING_RECOGNIZE: &str = "/google.cloud.speech.v1.Speech/StreamingRecognize";
/// The key of `StreamingRecognizeRequest.audio_content`: field 2, length-delimited.
const AUDIO_CONTENT_KEY: u8 = (2 << 3) | 2;
/// A response larger than this ends the stream (RESOURCE_EXHAUSTED): a result is a few hundred
/// bytes, so only a broken peer sends one.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// HTTP/2 keepalive: a connection whose PING goes unanswered is closed, failing its streams
/// (which retry on another), rather than left to TCP's much longer timeouts.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive windows (responses only: small), hyper's client defaults.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;

/// Where streams go, and how to reach it.
pub(crate) struct Target {
    /// `scheme://authority/google.cloud.speech.v1.Speech/StreamingRecognize`.
    uri: Uri,
    /// `host:port` to connect to.
    address: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    user_agent: HeaderValue,
    connect_timeout: Duration,
    write_coalesce: Duration,
}

impl Target {
    /// `endpoint` is checked already (scheme http or https, a host, no path). TLS trusts the
    /// webpki roots and the system's.
    pub fn new(
        endpoint: &Uri,
        connect_timeout: Duration,
        write_coalesce: Duration,
    ) -> Result<Target, String> {
        Target::with_roots(endpoint, connect_timeout, write_coalesce, default_roots)
    }

    fn with_roots(
        endpoint: &Uri,
        connect_timeout: Duration,
        write_coalesce: Duration,
        roots: impl FnOnce() -> rustls::RootCertStore,
    ) -> Result<Target, String> {
        let https = endpoint.scheme_str() == Some("https");
        let host = endpoint.host().ok_or("no host")?;
        let port = endpoint.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = endpoint.authority().ok_or("no host")?;
        let uri = Uri::builder()
            .scheme(if https { "https" } else { "http" })
            .authority(authority.as_str())
            .path_and_query(STREAMING_RECOGNIZE)
            .build()
            .map_err(|error| error.to_string())?;
        let tls = if https {
            // The name to verify is the host without IPv6 brackets.
            let name = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|_| "not a valid TLS server name")?;
            Some((tls_connector(roots())?, name))
        } else {
            None
        };
        Ok(Target {
            uri,
            address: format!("{host}:{port}"),
            tls,
            user_agent: HeaderValue::from_static(concat!(
                "voxflow/",
                env!("CARGO_PKG_VERSION"),
                " grpc-h2"
            )),
            connect_timeout,
            write_coalesce,
        })
    }

    /// A new HTTP/2 connection: TCP (no delay), TLS with ALPN h2 if https, writes coalesced.
    async fn connect(&self) -> io::Result<(SendRequest<Bytes>, Driver)> {
        let tcp = timeout(self.connect_timeout, TcpStream::connect(&self.address))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let (read, write) = tcp.into_split();
        let io = Coalesced::new(read, write, self.write_coalesce);
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        match &self.tls {
            None => {
                let (sender, connection) = builder.handshake(io).await.map_err(h2_io_error)?;
                Ok((sender, Box::pin(drive(connection))))
            }
            Some((connector, name)) => {
                let handshake = connector.connect(name.clone(), io);
                let tls = timeout(self.connect_timeout, handshake)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS timed out"))??;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(io::Error::other("the server did not agree to HTTP/2"));
                }
                let (sender, connection) = builder.handshake(tls).await.map_err(h2_io_error)?;
                Ok((sender, Box::pin(drive(connection))))
            }
        }
    }
}

fn default_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system's roots too (or SSL_CERT_FILE's), for private CAs and proxies; unreadable ones
    // are skipped.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

fn tls_connector(roots: rustls::RootCertStore) -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

type Driver = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Run a connection until it closes, fails, or stops answering PINGs.
async fn drive<T>(mut connection: h2::client::Connection<T, Bytes>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(mut ping) = connection.ping_pong() else {
        let _ = connection.await;
        return;
    };
    let keepalive = async {
        loop {
            sleep(KEEPALIVE_INTERVAL).await;
            match timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return "the connection failed",
                Err(_) => return "no answer to a keepalive PING",
            }
        }
    };
    tokio::select! {
        result = &mut connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "Upstream HTTP/2 connection ended.");
            }
        }
        reason = keepalive => {
            tracing::warn!(reason, "Closing an upstream HTTP/2 connection.");
        }
    }
}

fn h2_io_error(error: h2::Error) -> io::Error {
    if error.is_io() {
        error
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 handshake"))
    } else {
        io::Error::other(error)
    }
}

/// The connection's sender, and which connection it is (see [`Connection::sender`]).
type SenderSlot = Arc<Mutex<Option<(u64, SendRequest<Bytes>)>>>;

/// One HTTP/2 connection of the pool, (re)connected on demand.
pub(crate) struct Connection {
    sender: SenderSlot,
    /// Streams open on it, for picking the least-loaded connection.
    pub streams: Arc<AtomicUsize>,
}

impl Connection {
    pub fn new() -> Connection {
        Connection {
            sender: Arc::new(Mutex::new(None)),
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The connection's sender and its generation, connecting first if there is none (one
    /// caller connects while the others wait for it). A connection that ends forgets itself, so
    /// the next caller connects anew.
    async fn sender(&self, target: &Target) -> Result<(u64, SendRequest<Bytes>), Status> {
        let mut slot = self.sender.lock().await;
        if let Some((generation, sender)) = slot.as_ref() {
            return Ok((*generation, sender.clone()));
        }
        let (sender, driver) = target
            .connect()
            .await
            .map_err(|error| Status::unavailable(format!("connecting upstream: {error}")))?;
        let generation = rand::random::<u64>();
        *slot = Some((generation, sender.clone()));
        // Weak: the slot's sender keeps the connection open, so a strong reference here would
        // keep it open after the pool is gone.
        let shared = Arc::downgrade(&self.sender);
        tokio::spawn(async move {
            driver.await;
            if let Some(shared) = shared.upgrade() {
                forget(&shared, generation).await;
            }
        });
        Ok((generation, sender))
    }

    /// Start a call whose first message is `first`. The response headers are not awaited: a
    /// server may hold them until it has a result, so audio must flow before they come.
    ///
    /// A connection that refuses new streams (it was told to go away, or it failed and its
    /// task has not noticed yet) is replaced once, at once, rather than failing the call.
    pub async fn open(
        &self,
        target: &Target,
        authorization: Option<HeaderValue>,
        first: &StreamingRecognizeRequest,
    ) -> Result<(Requests, ResponseFuture), Status> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = target.uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::USER_AGENT, target.user_agent.clone());
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (generation, sender) = self.sender(target).await?;
            // `ready` waits while the connection is at the server's limit of concurrent streams.
            let started = match sender.ready().await {
                Ok(mut sender) => sender.send_request(request.clone(), false),
                Err(error) => Err(error),
            };
            match started {
                Ok((response, stream)) => {
                    let mut requests = Requests {
                        stream,
                        finished: false,
                    };
                    requests.send(frame(first));
                    return Ok((requests, response));
                }
                Err(error) => {
                    forget(&self.sender, generation).await;
                    if attempts == 2 {
                        return Err(status_from_h2(&error));
                    }
                    tracing::debug!(%error, "An upstream connection refused a stream; reconnecting.");
                }
            }
        }
    }
}

/// Drop the connection `generation` from its slot, if it is still there.
async fn forget(slot: &SenderSlot, generation: u64) {
    let mut slot = slot.lock().await;
    if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
        *slot = None;
    }
}

/// A call's request side. Dropping it half-closes the call (as ending a request stream does).
pub(crate) struct Requests {
    stream: SendStream<Bytes>,
    finished: bool,
}

impl Requests {
    /// Whether a request may be sent now: the stream has flow-control capacity.
    pub fn has_room(&mut self) -> bool {
        self.stream.reserve_capacity(1);
        self.stream.capacity() > 0
    }

    /// Ready when [`Requests::has_room`] would say yes. A stream that failed never gets room:
    /// its response side reports why.
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.stream.reserve_capacity(1);
        loop {
            if self.stream.capacity() > 0 {
                return Poll::Ready(());
            }
            match self.stream.poll_capacity(cx) {
                Poll::Ready(Some(Ok(0))) => {}
                Poll::Ready(Some(Ok(_))) => return Poll::Ready(()),
                Poll::Ready(Some(Err(_)) | None) | Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Send audio: `samples` LINEAR16 samples, written by `fill` into the request's bytes.
    pub fn send_audio(&mut self, samples: usize, fill: impl FnOnce(&mut [u8])) {
        self.send(audio_frame(samples, fill));
    }

    /// A failed stream drops what is sent; its response side reports the error.
    fn send(&mut self, frame: Bytes) {
        if let Err(error) = self.stream.send_data(frame, false) {
            tracing::debug!(%error, "An upstream request was not sent.");
        }
    }

    /// Half-close: the server finalizes what it has and ends the call.
    pub fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.stream.send_data(Bytes::new(), true);
        }
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A message in gRPC's framing: uncompressed, 4-byte big-endian length, protobuf.
fn frame(message: &StreamingRecognizeRequest) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: the buffer has room for `encoded_len`.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// An audio request, framed, its `samples` × 2 bytes of content written in place by `fill`:
/// one allocation and one pass over the audio.
fn audio_frame(samples: usize, fill: impl FnOnce(&mut [u8])) -> Bytes {
    let content = samples * 2;
    let message = 1 + prost::encoding::encoded_len_varint(content as u64) + content;
    let mut buf = BytesMut::with_capacity(5 + message);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message).unwrap_or(u32::MAX));
    buf.put_u8(AUDIO_CONTENT_KEY);
    prost::encoding::encode_varint(content as u64, &mut buf);
    let start = buf.len();
    buf.resize(start + content, 0);
    fill(&mut buf[start..]);
    buf.freeze()
}

/// A call's response side, once its headers have come.
pub(crate) struct Responses {
    body: RecvStream,
    buf: BytesMut,
    /// The call's status arrived (trailers, or headers of a trailers-only response).
    ended: bool,
}

/// Wait for a call's response headers: an HTTP error or a trailers-only error is the call's
/// status.
pub(crate) async fn responses(response: ResponseFuture) -> Result<Responses, Status> {
    let response = response.await.map_err(|error| status_from_h2(&error))?;
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        return Err(status_from_http(parts.status));
    }
    let ended = match grpc_status(&parts.headers) {
        Some(status) => status.map(|()| true)?,
        None => false,
    };
    Ok(Responses {
        body,
        buf: BytesMut::new(),
        ended,
    })
}

impl Responses {
    /// The next response, `None` when the call ended well. Cancel-safe: what has arrived is
    /// kept in `self`.
    pub async fn message(&mut self) -> Result<Option<StreamingRecognizeResponse>, Status> {
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.ended {
                return Ok(None);
            }
            match poll_fn(|cx| self.body.poll_data(cx)).await {
                Some(Ok(chunk)) => {
                    // Read now, so the window reopens now.
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(error)) => return Err(status_from_h2(&error)),
                None => {
                    if !self.buf.is_empty() {
                        return Err(Status::internal("the response ended inside a message"));
                    }
                    let trailers = poll_fn(|cx| self.body.poll_trailers(cx))
                        .await
                        .map_err(|error| status_from_h2(&error))?;
                    self.ended = true;
                    return match trailers.as_ref().and_then(grpc_status) {
                        Some(status) => status.map(|()| None),
                        None => Err(Status::internal("the call ended without a grpc-status")),
                    };
                }
            }
        }
    }

    /// A whole message from the front of `buf`, if one is there.
    fn decode(&mut self) -> Result<Option<StreamingRecognizeResponse>, Status> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        if header[0] != 0 {
            return Err(Status::internal(
                "a compressed response, though none was asked for",
            ));
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_RESPONSE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "a response of {len} bytes (at most {MAX_RESPONSE_BYTES})"
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let message = self.buf.split_to(len);
        StreamingRecognizeResponse::decode(message)
            .map(Some)
            .map_err(|error| Status::internal(format!("a response that does not decode: {error}")))
    }
}

/// The call's status from `grpc-status` and `grpc-message`, if the headers carry one.
fn grpc_status(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let code = headers.get("grpc-status")?;
    let code = code
        .to_str()
        .ok()
        .and_then(|code| code.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from);
    if code == Code::Ok {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|value| percent_decode(value.as_bytes()))
        .unwrap_or_default();
    Some(Err(Status::new(code, message)))
}

/// `grpc-message` is percent-encoded UTF-8.
fn percent_decode(value: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                value.get(i + 1).copied().and_then(hex),
                value.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(value[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// gRPC's mapping of HTTP statuses that are not a gRPC answer.
fn status_from_http(status: StatusCode) -> Status {
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {status} from the upstream"))
}

/// A stream or connection failure as a status. Resets follow gRPC's mapping of HTTP/2 error
/// codes; a failed or closed connection is UNAVAILABLE (the call may succeed on another).
fn status_from_h2(error: &h2::Error) -> Status {
    let code = match error.reason() {
        _ if error.is_io() => Code::Unavailable,
        Some(Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(Reason::CANCEL) => Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        Some(_) if error.is_go_away() => Code::Unavailable,
        Some(_) => Code::Internal,
        None => Code::Unknown,
    };
    Status::new(code, format!("upstream HTTP/2: {error}"))
}

#[cfg(test)]
mod tests {
    use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::streaming_recognize_request::StreamingRequest;
    use googleapis_tonic_google_cloud_speech_v1::google::cloud::speech::v1::{
        SpeechRecognitionAlternative, StreamingRecognitionConfig, StreamingRecognitionResult,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// What the test server saw of one call.
    struct Seen {
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    /// An HTTP/2 server over TLS (ALPN h2) answering like Google: a call authorized with
    /// `Bearer good` gets its request body read to the end, then one final result and an OK
    /// status in the trailers; any other is refused at once with UNAUTHENTICATED in the response
    /// headers (a trailers-only response).
    async fn google_like_server() -> (u16, CertificateDer<'static>, mpsc::Receiver<Seen>) {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = key.cert.der().clone();
        let private = PrivateKeyDer::Pkcs8(key.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], private)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen_tx, seen) = mpsc::channel(4);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let mut connection = h2::server::handshake(tls).await.unwrap();
            while let Some(call) = connection.accept().await {
                let (request, respond) = call.unwrap();
                tokio::spawn(answer(request, respond, seen_tx.clone()));
            }
        });
        (port, cert, seen)
    }

    async fn answer(
        request: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        seen: mpsc::Sender<Seen>,
    ) {
        let (parts, mut body) = request.into_parts();
        let grpc = |status: &'static str| {
            http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", status)
        };
        if parts.headers.get("authorization").unwrap() != "Bearer good" {
            let refused = grpc("16")
                .header("grpc-message", "no%20valid%20token")
                .body(())
                .unwrap();
            respond.send_response(refused, true).unwrap();
        } else {
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                body.flow_control().release_capacity(chunk.len()).unwrap();
                received.extend_from_slice(&chunk);
            }
            let headers = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut out = respond.send_response(headers, false).unwrap();
            let result = StreamingRecognizeResponse {
                results: vec![StreamingRecognitionResult {
                    alternatives: vec![SpeechRecognitionAlternative {
                        transcript: "hello".into(),
                        ..Default::default()
                    }],
                    is_final: true,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let mut framed = BytesMut::new();
            framed.put_u8(0);
            framed.put_u32(result.encoded_len() as u32);
            result.encode(&mut framed).unwrap();
            // Split mid-message: the reader must put it back together.
            let framed = framed.freeze();
            out.send_data(framed.slice(..3), false).unwrap();
            out.send_data(framed.slice(3..), false).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            out.send_trailers(trailers).unwrap();
            seen.send(Seen {
                path: parts.uri.path().to_string(),
                headers: parts.headers,
                body: received,
            })
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn a_call_over_tls_sends_grpc_frames_and_reads_results_and_statuses() {
        let (port, cert, mut seen) = google_like_server().await;
        let endpoint: Uri = format!("https://localhost:{port}").parse().unwrap();
        let target = Target::with_roots(
            &endpoint,
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(cert).unwrap();
                roots
            },
        )
        .unwrap();
        let connection = Connection::new();
        let first = StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::StreamingConfig(
                StreamingRecognitionConfig {
                    interim_results: true,
                    ..Default::default()
                },
            )),
        };
        let good = HeaderValue::from_static("Bearer good");
        let (mut requests, response) = connection.open(&target, Some(good), &first).await.unwrap();
        poll_fn(|cx| requests.poll_room(cx)).await;
        assert!(requests.has_room());
        requests.send_audio(3, |out| out.copy_from_slice(&[1, 0, 2, 0, 3, 0]));
        requests.finish();
        let mut results = responses(response).await.unwrap();
        let result = results.message().await.unwrap().unwrap();
        assert_eq!(result.results[0].alternatives[0].transcript, "hello");
        assert!(results.message().await.unwrap().is_none(), "then OK");

        let seen = seen.recv().await.unwrap();
        assert_eq!(seen.path, STREAMING_RECOGNIZE);
        assert_eq!(seen.headers["content-type"], "application/grpc");
        assert_eq!(seen.headers["te"], "trailers");
        let audio = audio_frame(3, |out| out.copy_from_slice(&[1, 0, 2, 0, 3, 0]));
        assert_eq!(seen.body, [frame(&first), audio].concat());

        // A second call on the same connection, refused in its response headers.
        let bad = HeaderValue::from_static("Bearer bad");
        let (_requests, response) = connection.open(&target, Some(bad), &first).await.unwrap();
        let status = responses(response).await.err().unwrap();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "no valid token");
    }

    #[test]
    fn an_audio_frame_is_the_request_prost_would_encode() {
        let samples: Vec<i16> = (0..700).map(|i| (i * 37 - 9_000) as i16).collect();
        let framed = audio_frame(samples.len(), |out| {
            for (pair, s) in out.chunks_exact_mut(2).zip(&samples) {
                pair.copy_from_slice(&s.to_le_bytes());
            }
        });
        let content: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let request = StreamingRecognizeRequest {
            streaming_request: Some(StreamingRequest::AudioContent(content)),
        };
        assert_eq!(framed, frame(&request));
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 5);
        assert_eq!(
            StreamingRecognizeRequest::decode(&framed[5..]).unwrap(),
            request
        );
    }

    #[test]
    fn statuses_come_from_trailers_with_their_messages_decoded() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(matches!(grpc_status(&headers), Some(Ok(()))));
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("bad%20sample%20rate%3A%2099%25"),
        );
        let status = grpc_status(&headers).unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "bad sample rate: 99%");
        headers.insert("grpc-status", HeaderValue::from_static("nonsense"));
        assert_eq!(
            grpc_status(&headers).unwrap().unwrap_err().code(),
            Code::Unknown
        );
        assert_eq!(percent_decode(b"100%"), "100%");
        assert_eq!(
            status_from_http(StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_from_http(StatusCode::UNAUTHORIZED).code(),
            Code::Unauthenticated
        );
    }
}
