//! One load-test client: connect, stream the clip at real-time pace on a steady clock, read
//! transcripts, and account for every marker.
//!
//! Latency is measured on the client's own clock: a marker's final says where it ends
//! (`end_ms`); the client looks up when it sent the frame holding that sample and subtracts.
//! Sending and receiving are two futures of one task, sharing the send record (behind a mutex
//! that is never contended: it only makes the task `Send`).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::audio::Clip;
use super::progress::Live;
use crate::emulator::tones;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The Python tutorial's `{"audio_id":…,"content":"<base64>"}` text messages.
    Json,
    /// A `start` message, then one binary message per frame.
    Binary,
}

/// How long a client waits for the server's last finals and `closed` after its `stop`.
const FINAL_WAIT: Duration = Duration::from_secs(10);

pub struct Plan {
    pub number: usize,
    pub url: String,
    pub mode: Mode,
    pub start_message: String,
    pub connect_at: Instant,
    /// Stop after the marker that follows this instant.
    pub stop_at: Instant,
    pub first_segment: usize,
    pub behind: Duration,
}

/// Why a client fell behind real time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// Its sends blocked: the server stopped reading the socket.
    ServerNotReading,
    /// Its task woke late: the load generator itself is short of CPU.
    Generator,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub connected: bool,
    pub connect_error: Option<String>,
    /// The server's `error` code, or a transport error.
    pub error: Option<String>,
    /// The session ended with `closed` after our `stop`.
    pub closed_cleanly: bool,
    pub frames_sent: u64,
    pub markers_sent: u64,
    pub markers_received: u64,
    pub duplicates: u64,
    /// Marker finals whose id is not the marker sent at their position.
    pub misplaced: u64,
    pub dropped_audio_ms: u64,
    pub finals: u64,
    pub interims: u64,
    /// (when the marker's last frame was sent, latency).
    pub latencies: Vec<(Instant, Duration)>,
    pub max_lateness: Duration,
    pub behind: Option<Behind>,
}

impl Outcome {
    pub fn lost_markers(&self) -> u64 {
        self.markers_sent.saturating_sub(self.markers_received)
    }
}

/// What the sender did, for the receiver to look up.
struct Timeline {
    start: Instant,
    /// Send time of every frame, microseconds after `start`.
    sent_us: Vec<u32>,
    /// Each marker's frames `[first, end)`, in order; the index is its sequence number.
    markers: Vec<(u64, u64)>,
    received: Vec<bool>,
}

#[derive(Deserialize)]
struct ServerMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    transcript: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    end_ms: u64,
    #[serde(default, borrow)]
    code: Option<&'a str>,
    #[serde(default)]
    dropped_ms: u64,
}

pub async fn run(plan: Plan, clip: Arc<Clip>, live: Arc<Live>) -> Outcome {
    let mut outcome = Outcome::default();
    sleep_until(plan.connect_at).await;
    // tungstenite zeroes its whole read buffer (128 KiB by default) on every read: at 50
    // reads a second per client that was a third of the load generator's CPU. Server messages
    // are small.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let connect =
        tokio_tungstenite::connect_async_with_config(plan.url.as_str(), Some(config), true);
    let socket = match timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(error)) => {
            outcome.connect_error = Some(error.to_string());
            live.connect_errors.fetch_add(1, Ordering::Relaxed);
            return outcome;
        }
        Err(_) => {
            outcome.connect_error = Some("connect timed out after 10 s".into());
            live.connect_errors.fetch_add(1, Ordering::Relaxed);
            return outcome;
        }
    };
    outcome.connected = true;
    live.connected.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = socket.split();
    let timeline = Mutex::new(Timeline {
        start: Instant::now(),
        sent_us: Vec::new(),
        markers: Vec::new(),
        received: Vec::new(),
    });

    // When the sender finished: the receiver then waits a bounded time for the last finals.
    let sender_done = Mutex::new(None::<Instant>);
    let send = async {
        let result = send_all(&plan, &clip, &live, &timeline, &mut sink).await;
        if result.is_ok() {
            let _ = sink.send(Message::text(r#"{"type":"stop"}"#)).await;
        }
        *sender_done.lock().expect("one task") = Some(Instant::now());
        result
    };
    let receive = async {
        let mut rx = Received::default();
        loop {
            // Re-checked every second, so a stopped sender bounds the wait without a signal.
            let deadline = match *sender_done.lock().expect("one task") {
                Some(done) => (done + FINAL_WAIT).min(Instant::now() + Duration::from_secs(1)),
                None => Instant::now() + Duration::from_secs(1),
            };
            let message = match tokio::time::timeout_at(deadline, source.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_)
                    if sender_done
                        .lock()
                        .expect("one task")
                        .is_some_and(|done| done.elapsed() >= FINAL_WAIT) =>
                {
                    rx.error
                        .get_or_insert_with(|| "no `closed` within 10 s of stop".into());
                    break;
                }
                Err(_) => continue,
            };
            match message {
                Ok(Message::Text(text)) => rx.handle(text.as_str(), &clip, &live, &timeline),
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(error) => {
                    rx.error.get_or_insert(format!("transport: {error}"));
                    break;
                }
            }
        }
        rx
    };
    let (sent, rx) = tokio::join!(send, receive);
    live.connected.fetch_sub(1, Ordering::Relaxed);
    let timeline = timeline.into_inner().expect("one task");
    let (Ok(stats) | Err(stats)) = sent;
    outcome.frames_sent = stats.frames;
    outcome.max_lateness = stats.max_lateness;
    outcome.behind = stats.behind;
    outcome.error = stats.error;
    outcome.markers_sent = timeline.markers.len() as u64;
    outcome.markers_received = timeline.received.iter().filter(|&&r| r).count() as u64;
    outcome.duplicates = rx.duplicates;
    outcome.misplaced = rx.misplaced;
    outcome.dropped_audio_ms = rx.dropped_ms;
    outcome.finals = rx.finals;
    outcome.interims = rx.interims;
    outcome.latencies = rx.latencies;
    outcome.closed_cleanly = rx.closed;
    if let Some(error) = rx.error {
        outcome.error = Some(error);
    }
    outcome
}

#[derive(Default)]
struct SendStats {
    frames: u64,
    max_lateness: Duration,
    behind: Option<Behind>,
    error: Option<String>,
}

async fn send_all<S>(
    plan: &Plan,
    clip: &Clip,
    live: &Live,
    timeline: &Mutex<Timeline>,
    sink: &mut S,
) -> Result<SendStats, SendStats>
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mut stats = SendStats::default();
    if plan.mode == Mode::Binary
        && let Err(error) = sink.send(Message::text(plan.start_message.clone())).await
    {
        stats.error = Some(format!("transport: {error}"));
        return Err(stats);
    }
    let start = timeline.lock().expect("one task").start;
    let frame = Duration::from_micros(u64::from(clip.frame_ms) * 1000);
    let prefix = format!(r#"{{"audio_id":"loadtest-{}","content":""#, plan.number);
    // Time lost to blocked sends and to late wake-ups since the client was last on time.
    let (mut blocked, mut woke_late) = (Duration::ZERO, Duration::ZERO);
    let mut seq = 0usize;
    let mut segment = plan.first_segment;
    loop {
        let piece = clip.pieces[segment % clip.pieces.len()].clone();
        let marker = &clip.markers[seq % usize::from(tones::MARKER_IDS)];
        {
            let mut timeline = timeline.lock().expect("one task");
            let first = stats.frames + piece.len() as u64;
            timeline.markers.push((first, first + marker.len() as u64));
            timeline.received.push(false);
        }
        for audio in clip.speech[piece].iter().chain(marker) {
            let deadline = start + frame * stats.frames as u32;
            let slept = Instant::now() < deadline;
            sleep_until(deadline).await;
            let before = Instant::now();
            let late = before.saturating_duration_since(deadline);
            // Within a frame of the schedule counts as on time (timers have millisecond grain).
            if late < frame {
                (blocked, woke_late) = (Duration::ZERO, Duration::ZERO);
            } else if slept {
                woke_late += late;
            }
            stats.max_lateness = stats.max_lateness.max(late);
            if late > plan.behind && stats.behind.is_none() {
                stats.behind = Some(if blocked >= woke_late {
                    Behind::ServerNotReading
                } else {
                    Behind::Generator
                });
                live.behind.fetch_add(1, Ordering::Relaxed);
            }
            let message = match plan.mode {
                Mode::Binary => Message::Binary(audio.binary.clone()),
                Mode::Json => {
                    let mut text = String::with_capacity(prefix.len() + audio.base64.len() + 2);
                    text.push_str(&prefix);
                    text.push_str(&audio.base64);
                    text.push_str("\"}");
                    Message::text(text)
                }
            };
            timeline
                .lock()
                .expect("one task")
                .sent_us
                .push(u32::try_from((before - start).as_micros()).unwrap_or(u32::MAX));
            if let Err(error) = sink.send(message).await {
                stats.error = Some(format!("transport: {error}"));
                return Err(stats);
            }
            let took = before.elapsed();
            if took > Duration::from_millis(2) {
                blocked += took;
            }
            stats.frames += 1;
            live.frames.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
        segment += 1;
        if Instant::now() >= plan.stop_at {
            return Ok(stats);
        }
    }
}

#[derive(Default)]
struct Received {
    duplicates: u64,
    misplaced: u64,
    dropped_ms: u64,
    finals: u64,
    interims: u64,
    latencies: Vec<(Instant, Duration)>,
    closed: bool,
    error: Option<String>,
}

impl Received {
    fn handle(&mut self, text: &str, clip: &Clip, live: &Live, timeline: &Mutex<Timeline>) {
        let now = Instant::now();
        let Ok(message) = serde_json::from_str::<ServerMessage<'_>>(text) else {
            self.error
                .get_or_insert_with(|| format!("unparsable server message: {text:.200}"));
            return;
        };
        match message.kind {
            "transcript" if !message.is_final => self.interims += 1,
            "transcript" => {
                self.finals += 1;
                let Some(id) = message.transcript.as_deref().and_then(tones::parse_marker) else {
                    return;
                };
                self.marker(id, message.end_ms, now, clip, live, timeline);
            }
            "warning" if message.code == Some("audio_dropped") => {
                self.dropped_ms += message.dropped_ms;
                live.dropped_ms
                    .fetch_add(message.dropped_ms, Ordering::Relaxed);
            }
            "error" => {
                let code = message.code.unwrap_or("unknown");
                self.error.get_or_insert_with(|| format!("server: {code}"));
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
            "closed" => self.closed = true,
            _ => {}
        }
    }

    fn marker(
        &mut self,
        id: u16,
        end_ms: u64,
        now: Instant,
        clip: &Clip,
        live: &Live,
        timeline: &Mutex<Timeline>,
    ) {
        let mut timeline = timeline.lock().expect("one task");
        // `end_ms` is rounded down; the frame holding the sample just before it is the latest
        // frame the result can be sure to cover, so latency is never understated.
        let end_sample = end_ms * u64::from(clip.rate_hz) / 1000;
        let frame = end_sample.saturating_sub(1) / clip.samples_per_frame as u64;
        let Some(&sent_us) = timeline.sent_us.get(frame as usize) else {
            self.misplaced += 1;
            return;
        };
        let seq = timeline
            .markers
            .partition_point(|&(first, _)| first <= frame)
            .checked_sub(1);
        let Some(seq) = seq.filter(|&seq| {
            let (_, end) = timeline.markers[seq];
            frame < end && seq % usize::from(tones::MARKER_IDS) == usize::from(id)
        }) else {
            self.misplaced += 1;
            return;
        };
        if std::mem::replace(&mut timeline.received[seq], true) {
            self.duplicates += 1;
            return;
        }
        let sent = timeline.start + Duration::from_micros(u64::from(sent_us));
        let latency = now.saturating_duration_since(sent);
        self.latencies.push((sent, latency));
        live.record(latency);
    }
}
