//! One session: agree the format, build the stage graph, run it, and end it cleanly.
//!
//! The first message decides the format: a `start` (merged over the URL's query parameters
//! and the configured defaults), or audio that then uses those defaults. The graph is built
//! only once the format is known, so every stage checks its input format before audio flows.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{SinkExt, StreamExt};
use pipeline::edge::edge;
use pipeline::metrics::{StageMetrics, sessions};
use pipeline::processor::{Downstream, Inline, Processor, Route, StageError, run_processor};
use pipeline::protocol::{
    self, ClientMessage, EffectiveConfig, ProtocolError, ServerMessage, StartFields,
};
use pipeline::rare::Rare;
use pipeline::session::close_code;
use pipeline::{
    AudioFormat, EdgeSettings, EdgeTx, Flow, Payload, SessionError, SessionShared, StreamConfig,
    SttStream, stage,
};
use stages::batch::Batch;
use stages::decode::Decode;
use stages::egress::{self, Egress, Outcome};
use stages::ingress::{FrameReader, Ingress, IngressEnd};
use stages::resample::Resample;
use stages::stt::Stt;
use stages::vad::Vad;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::Instrument;

use super::Shared;
use crate::config::Settings;

/// What a session was set up with.
struct Plan {
    format: AudioFormat,
    effective: EffectiveConfig,
    stream: StreamConfig,
}

/// The socket's halves: voxflow's frame reader, and tungstenite for writing (see
/// [`FrameReader`] for why). Boxed: the session's nested futures each hold them.
pub(super) type Sink<S> = Box<WebSocketStream<WriteOnly<WriteHalf<S>>>>;
pub(super) type Source<S> = Box<FrameReader<ReadHalf<S>>>;

/// Split an upgraded connection into the session's halves.
pub(super) async fn split<S>(socket: S, settings: &Settings) -> (Sink<S>, Source<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read, write) = tokio::io::split(socket);
    let source = FrameReader::new(read, settings.read_buffer_bytes, settings.max_message_bytes);
    let config = WebSocketConfig::default()
        // Nothing is read through tungstenite: no read buffer.
        .read_buffer_size(0)
        // A slow reader must push back, not make the server buffer for it.
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024);
    let sink = WebSocketStream::from_raw_socket(WriteOnly(write), Role::Server, Some(config)).await;
    (Box::new(sink), Box::new(source))
}

/// One session's future. Not an `async fn`, which would keep its arguments twice.
pub(super) fn run<S>(
    sink: Sink<S>,
    source: Source<S>,
    query: StartFields,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session_id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("session", id = %session_id, %peer);
    let query = Box::new(query);
    async move {
        sessions::opened();
        let reason = serve(sink, source, session_id, query, &shared).await;
        tracing::info!(reason, "Session ended.");
        sessions::closed(reason);
    }
    .instrument(span)
}

/// The write half, for tungstenite, which needs a reader's type but never reads when it only
/// writes.
pub(super) struct WriteOnly<W>(W);

impl<W: Unpin> AsyncRead for WriteOnly<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::Error::other(
            "the socket's read half is elsewhere",
        )))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WriteOnly<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Split in three so that the session's future stays small: it lives for the whole session,
/// one per connection, and an `async fn` keeps every local that is in scope at an `.await`
/// (moved out or not). The graph is built in plain functions, whose locals live on the stack.
async fn serve<S>(
    mut sink: Sink<S>,
    mut source: Source<S>,
    session_id: String,
    query: Box<StartFields>,
    shared: &Shared,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match open(&mut sink, &mut source, &session_id, query, shared).await {
        Ok(opened) => drive(sink, source, session_id, opened, shared).await,
        Err(reason) => reason,
    }
}

/// A session whose format is agreed and whose graph is built and running behind ingress.
struct Opened<D> {
    /// The head of the stage chain that runs in the socket's task (boxed: the inline stages
    /// are kilobytes, and the futures that carry them nest).
    chain: Box<D>,
    /// The first message, when it was audio.
    replay: Option<Message>,
    format: AudioFormat,
    effective: EffectiveConfig,
    session: Arc<SessionShared>,
    ingress_metrics: StageMetrics,
    egress_in: egress::Results,
}

/// Read the first message, agree the format and build the graph; or refuse the session
/// (the error is `Session ended`'s reason).
async fn open<S>(
    sink: &mut Sink<S>,
    source: &mut Source<S>,
    session_id: &str,
    query: Box<StartFields>,
    shared: &Shared,
) -> Result<Box<Opened<impl Downstream<Payload> + 'static>>, &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &shared.settings;
    // The first message (pings before it are answered here: egress is not running yet), bounded
    // like any other wait for the client.
    let first = tokio::time::timeout(settings.idle_timeout, async {
        loop {
            match source.next().await {
                Some(Ok(Message::Ping(payload))) => {
                    if sink.send(Message::Pong(payload)).await.is_err() {
                        return None;
                    }
                }
                other => return other,
            }
        }
    });
    let first = tokio::select! {
        first = first => Some(first),
        () = shared.draining.cancelled() => None,
    };
    let Some(first) = first else {
        refuse(sink, shared, &shutting_down()).await;
        return Err("shutdown");
    };
    let first = match first {
        Ok(Some(Ok(message))) => message,
        // An oversized first message is refused like any other, not dropped silently.
        Ok(Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(error)))) => {
            let error = SessionError {
                code: "message_too_big",
                message: error.to_string(),
                close_code: close_code::MESSAGE_TOO_BIG,
            };
            refuse(sink, shared, &error).await;
            return Err("error");
        }
        Ok(Some(Err(_)) | None) => return Err("client_gone"),
        Err(_) => {
            let error = SessionError {
                code: "idle_timeout",
                message: "no message after connecting".into(),
                close_code: close_code::POLICY_VIOLATION,
            };
            refuse(sink, shared, &error).await;
            return Err("error");
        }
    };
    if let Message::Close(_) = first {
        return Err("client_gone");
    }
    match build(session_id, *query, first, shared) {
        Ok(opened) => Ok(opened),
        Err((error, reason)) => {
            refuse(sink, shared, &error).await;
            Err(reason)
        }
    }
}

/// From the first message on: the plan, each stage (each checks its input format as it is
/// built, before any audio flows), the engine's stream, and the graph's tasks.
fn build(
    session_id: &str,
    query: StartFields,
    first: Message,
    shared: &Shared,
) -> Result<Box<Opened<impl Downstream<Payload> + 'static>>, (SessionError, &'static str)> {
    let settings = &shared.settings;
    let error = |error: SessionError| (error, "error");
    let mut first_audio_id = None;
    let (fields, replay) = match &first {
        Message::Text(text) => match protocol::parse(text) {
            Ok(ClientMessage::Start(fields)) => (Some(*fields), None),
            Ok(message) => {
                // The tutorial's clients name their stream in every audio message, never in a start.
                if let ClientMessage::Audio {
                    audio_id: Some(id), ..
                } = message
                {
                    first_audio_id = Some(id.into_owned());
                }
                (None, Some(first))
            }
            Err(e) => return Err(error(e.to_session_error())),
        },
        Message::Binary(_) => (None, Some(first)),
        _ => (None, None),
    };
    if fields.is_none() && settings.session.require_start && replay.is_some() {
        let violation = ProtocolError::Violation(
            "send a start message before audio (this server requires one)".into(),
        );
        return Err(error(violation.to_session_error()));
    }
    let mut fields = fields.unwrap_or_default();
    fields.audio_id = fields.audio_id.or(first_audio_id);
    let plan = plan(session_id, query, fields, shared).map_err(error)?;
    let decode = Decode::new(plan.format).map_err(|e| error(e.to_session_error()))?;
    let resample = Resample::new(plan.format.sample_rate_hz, settings.stt.sample_rate_hz)
        .map_err(|e| error(e.to_session_error()))?;
    let stream = shared.engine.open(plan.stream.clone()).map_err(|e| {
        sessions::refused("engine");
        (stages::stt::session_error(&e), "refused")
    })?;

    // Build the graph: ingress → decode → resample → vad → batch → stt → egress, from the end.
    // Each edge with a capacity is a queue in front of a task of its own; an edge of capacity 0
    // runs its stage in the task that feeds it (by default everything up to the engine runs in
    // the socket's task: one task wake-up per frame on the way in, not one per stage).
    let session = Arc::new(SessionShared::new());
    let metrics = stage::ALL.map(StageMetrics::new);
    let [
        m_ingress,
        m_decode,
        m_resample,
        m_vad,
        m_batch,
        m_stt,
        m_egress,
    ] = &metrics;
    let edges = &settings.edges;
    let span = tracing::Span::current();
    let graph = Graph {
        session: &session,
        span: &span,
    };

    let SttStream { audio, results } = stream;
    let egress_in = match edges.egress.queue() {
        // Egress reads the engine's queue itself: no relay task, no second queue.
        None => egress::Results::Engine {
            results,
            stt: m_stt.clone(),
            egress: m_egress.clone(),
        },
        Some(_) => {
            let (to_egress, egress_in) = edge(edges.egress, m_stt, m_egress, &session);
            graph.spawn(stages::stt::relay(
                results,
                to_egress,
                m_stt.clone(),
                Arc::clone(&session),
            ));
            egress::Results::Queued(egress_in)
        }
    };
    let to_stt = match edges.stt.queue() {
        None => Route::Inline(Stt::new(
            audio,
            m_batch.clone(),
            m_stt.clone(),
            edges.stt,
            Arc::clone(&session),
        )),
        Some(_) => {
            let (tx, rx) = edge(edges.stt, m_batch, m_stt, &session);
            graph.spawn(stages::stt::run(audio, rx, Arc::clone(&session)));
            Route::Queued(tx)
        }
    };
    let to_batch = match edges.batch.queue() {
        None => Route::Inline(Batch::new(
            settings.batch,
            to_stt,
            m_vad.clone(),
            m_batch.clone(),
            Arc::clone(&session),
        )),
        Some(_) => {
            let (tx, rx) = edge(edges.batch, m_vad, m_batch, &session);
            graph.spawn(stages::batch::run(
                settings.batch,
                rx,
                to_stt,
                Arc::clone(&session),
            ));
            Route::Queued(tx)
        }
    };
    let vad = Vad::new(settings.vad, shared.engine.vad_gate());
    let to_vad = graph.stage(vad, edges.vad, m_resample, m_vad, to_batch);
    let to_resample = graph.stage(resample, edges.resample, m_decode, m_resample, to_vad);
    let chain = Box::new(graph.stage(decode, edges.decode, m_ingress, m_decode, to_resample));
    Ok(Box::new(Opened {
        chain,
        replay,
        format: plan.format,
        effective: plan.effective,
        ingress_metrics: m_ingress.clone(),
        session,
        egress_in,
    }))
}

/// Run the built graph: ingress in this task, egress in its own, until the session ends.
async fn drive<S, D>(
    sink: Sink<S>,
    mut source: Source<S>,
    session_id: String,
    opened: Box<Opened<D>>,
    shared: &Shared,
) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Downstream<Payload> + 'static,
{
    let settings = &shared.settings;
    let Opened {
        chain,
        replay,
        format,
        effective,
        session,
        ingress_metrics,
        egress_in,
    } = *opened;
    let egress = Egress::new(
        sink,
        session_id,
        effective,
        settings.write_timeout,
        Arc::clone(&session),
    )
    .with_retry_after(settings.limits.retry_after);
    // Polled only when it ends, not at every frame ingress handles (see `Rare`).
    let span = tracing::Span::current();
    let mut egress = Rare::new(tokio::spawn(egress.run(egress_in).instrument(span)));
    let ingress = Ingress::new(
        format,
        settings.idle_timeout,
        Arc::clone(&session),
        ingress_metrics,
    )
    .with_max_burst(settings.max_burst);
    // Shutdown or the session's time limit: either way ingress stops and the graph drains.
    let limit = settings.limits.max_session_duration;
    let stop = async {
        tokio::select! {
            () = shared.draining.cancelled() => {}
            () = tokio::time::sleep(limit) => session.set_time_limit_reached(),
        }
    };
    let ended = tokio::select! {
        end = ingress.run(&mut source, replay, chain, stop) => end,
        outcome = &mut egress => {
            let outcome = outcome.unwrap_or(Outcome::ClientGone);
            await_close(&mut source, outcome).await;
            return reason(outcome, &session);
        }
    };
    if matches!(ended, IngressEnd::ClientGone | IngressEnd::ClientClosed) {
        if ended == IngressEnd::ClientClosed {
            // Egress answers the client's close frame; it gets as long as a closing handshake.
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut egress).await;
        }
        egress.inner_mut().abort();
        return "client_gone";
    }
    // Stop, shutdown or failure: the graph drains behind ingress; egress says the last word.
    let outcome = egress.await.unwrap_or(Outcome::ClientGone);
    await_close(&mut source, outcome).await;
    reason(outcome, &session)
}

/// How long the closing handshake may take once voxflow has sent its close frame.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// After egress sent the close frame: read (and discard) until the client's close arrives or
/// the socket ends. Dropped with audio still unread in it, the socket is reset rather than
/// closed, and the client sees 1006 instead of the code it was sent (audio a client sends after
/// `stop`, before it reads the close, is what would be left unread).
async fn await_close<S>(source: &mut S, outcome: Outcome)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    if outcome == Outcome::ClientGone {
        return;
    }
    let drain = async { while let Some(Ok(_)) = source.next().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// Where the graph's tasks are spawned, for one session.
struct Graph<'a> {
    session: &'a Arc<SessionShared>,
    span: &'a tracing::Span,
}

impl Graph<'_> {
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        spawn_in(self.span, task);
    }

    /// A synchronous stage in front of `output`: run by its feeder when its edge has no queue,
    /// else in a task of its own behind one. Returns where the feeder sends.
    fn stage<P, D>(
        &self,
        processor: P,
        settings: EdgeSettings,
        from: &StageMetrics,
        metrics: &StageMetrics,
        output: D,
    ) -> Route<Inline<P, D>, EdgeTx<Flow<P::In>>>
    where
        P: Processor,
        D: Downstream<P::Out> + 'static,
    {
        match settings.queue() {
            None => Route::Inline(Inline::new(
                processor,
                from.clone(),
                metrics.clone(),
                output,
                Arc::clone(self.session),
            )),
            Some(_) => {
                let (tx, rx) = edge(settings, from, metrics, self.session);
                self.spawn(run_processor(
                    processor,
                    rx,
                    output,
                    Arc::clone(self.session),
                ));
                Route::Queued(tx)
            }
        }
    }
}

fn spawn_in<F>(span: &tracing::Span, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(task.instrument(span.clone()));
}

fn reason(outcome: Outcome, session: &SessionShared) -> &'static str {
    match outcome {
        Outcome::Completed if session.time_limit_reached() => "max_duration",
        Outcome::Completed if session.going_away() => "shutdown",
        Outcome::Completed => "normal",
        Outcome::Failed => "error",
        Outcome::ClientGone => "client_gone",
    }
}

/// Merge `start` over the query over the defaults, and check it.
fn plan(
    session_id: &str,
    query: StartFields,
    start: StartFields,
    shared: &Shared,
) -> Result<Plan, SessionError> {
    let defaults = &shared.settings.session;
    let stt = &shared.settings.stt;
    let pick = |a: Option<String>, b: Option<String>| a.or(b);
    let encoding = match pick(start.encoding, query.encoding) {
        Some(name) => protocol::parse_encoding(&name).map_err(|e| e.to_session_error())?,
        None => defaults.encoding,
    };
    let format = AudioFormat {
        encoding,
        sample_rate_hz: start
            .sample_rate_hertz
            .or(query.sample_rate_hertz)
            .unwrap_or(defaults.sample_rate_hertz),
        channels: start
            .audio_channel_count
            .or(query.audio_channel_count)
            .unwrap_or(defaults.audio_channel_count),
    };
    if !format.encoding.supports_rate(format.sample_rate_hz) || !(1..=2).contains(&format.channels)
    {
        return Err(ProtocolError::Unsupported(format!(
            "{} at {} Hz with {} channel(s) is not supported",
            format.encoding.as_str(),
            format.sample_rate_hz,
            format.channels
        ))
        .to_session_error());
    }
    let language_code =
        pick(start.language_code, query.language_code).unwrap_or_else(|| stt.language_code.clone());
    let interim_results = start
        .interim_results
        .or(query.interim_results)
        .unwrap_or(stt.interim_results);
    let audio_id = pick(start.audio_id, query.audio_id).unwrap_or_else(|| session_id.to_string());
    let stream = StreamConfig {
        sample_rate_hz: stt.sample_rate_hz,
        language_code: language_code.clone(),
        alternative_language_codes: start
            .alternative_language_codes
            .or(query.alternative_language_codes)
            .unwrap_or_default(),
        model: pick(start.model, query.model),
        interim_results,
        punctuation: start
            .enable_automatic_punctuation
            .or(query.enable_automatic_punctuation)
            .unwrap_or(true),
        profanity_filter: start
            .profanity_filter
            .or(query.profanity_filter)
            .unwrap_or(false),
        word_time_offsets: start
            .enable_word_time_offsets
            .or(query.enable_word_time_offsets)
            .unwrap_or(false),
        phrase_hints: start
            .phrase_hints
            .or(query.phrase_hints)
            .unwrap_or_default(),
    };
    let effective = EffectiveConfig {
        audio_id,
        encoding,
        sample_rate_hertz: format.sample_rate_hz,
        audio_channel_count: format.channels,
        language_code,
        interim_results,
        engine: shared.engine.name(),
        engine_sample_rate_hertz: stt.sample_rate_hz,
    };
    Ok(Plan {
        format,
        effective,
        stream,
    })
}

fn shutting_down() -> SessionError {
    SessionError {
        code: "shutting_down",
        message: "the server is shutting down; reconnect".into(),
        close_code: close_code::GOING_AWAY,
    }
}

/// Tell the client why the session cannot start, and close.
async fn refuse<S>(sink: &mut Sink<S>, shared: &Shared, error: &SessionError)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    sessions::client_error(error.code);
    tracing::info!(code = error.code, message = %error.message, "Session refused.");
    let message = ServerMessage::Error {
        code: error.code,
        message: &error.message,
        retry_after_ms: (error.close_code == close_code::TRY_AGAIN_LATER)
            .then_some(shared.settings.limits.retry_after.as_millis() as u64),
    }
    .to_json();
    let frame = CloseFrame {
        code: error.close_code.into(),
        reason: error.code.into(),
    };
    let _ = sink.send(Message::text(message)).await;
    let _ = sink.send(Message::Close(Some(frame))).await;
}
