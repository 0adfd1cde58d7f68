//! What the stages of one session share: audio dropped so far, the first fatal error, and a
//! ping to answer.
//!
//! Stages never talk to the socket; they record here and egress, woken by [`SessionShared::changed`],
//! tells the client (a `warning` for drops, an `error` and a close code for a fatal error, a pong
//! for a ping ingress read).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

/// A session-ending error, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionError {
    /// Protocol error code (`invalid_audio`, `overloaded`, `engine_error`, …).
    pub code: &'static str,
    pub message: String,
    /// WebSocket close code sent after the `error` message.
    pub close_code: u16,
}

/// WebSocket close codes used by voxflow (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

#[derive(Debug, Default)]
pub struct SessionShared {
    dropped_items: AtomicU64,
    dropped_us: AtomicU64,
    fatal: Mutex<Option<SessionError>>,
    notify: Notify,
    going_away: AtomicBool,
    time_limit: AtomicBool,
    /// The payload of the last ping not yet answered (RFC 6455 §5.5.3: only the latest needs a
    /// pong).
    pong: Mutex<Option<Bytes>>,
    /// The code of the close frame the client sent; 0 while it has sent none.
    client_closed: AtomicU16,
}

impl SessionShared {
    pub fn new() -> SessionShared {
        SessionShared::default()
    }

    /// Record an item of `audio_us` microseconds that will never reach the engine.
    pub fn record_drop(&self, audio_us: u64) {
        self.dropped_items.fetch_add(1, Ordering::Relaxed);
        self.dropped_us.fetch_add(audio_us, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Items and microseconds of audio dropped since the session began.
    pub fn drops(&self) -> (u64, u64) {
        (
            self.dropped_items.load(Ordering::Relaxed),
            self.dropped_us.load(Ordering::Relaxed),
        )
    }

    /// End the session with `error`. The first error wins; later ones are consequences.
    pub fn fail(&self, error: SessionError) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_none() {
            *fatal = Some(error);
        }
        drop(fatal);
        self.notify.notify_one();
    }

    pub fn fatal(&self) -> Option<SessionError> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Mark the session as ending because the server is shutting down (close 1001, not 1000).
    pub fn set_going_away(&self) {
        self.going_away.store(true, Ordering::Relaxed);
    }

    pub fn going_away(&self) -> bool {
        self.going_away.load(Ordering::Relaxed)
    }

    /// Mark the session as ending because it reached its maximum duration: it drains like a
    /// shutdown, but the client is told `max_duration` and may reconnect at once.
    pub fn set_time_limit_reached(&self) {
        self.time_limit.store(true, Ordering::Relaxed);
    }

    pub fn time_limit_reached(&self) -> bool {
        self.time_limit.load(Ordering::Relaxed)
    }

    /// The client sent a close frame with `code`: egress answers with the same code (RFC 6455
    /// §5.5.1) and ends.
    pub fn set_client_closed(&self, code: u16) {
        self.client_closed.store(code.max(1), Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// The code of the client's close frame, once it sent one.
    pub fn client_closed(&self) -> Option<u16> {
        match self.client_closed.load(Ordering::Relaxed) {
            0 => None,
            code => Some(code),
        }
    }

    /// Ask egress to answer a ping with `payload`.
    pub fn queue_pong(&self, payload: Bytes) {
        *self.pong.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
        self.notify.notify_one();
    }

    /// The ping to answer, if one came since the last call.
    pub fn take_pong(&self) -> Option<Bytes> {
        self.pong.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Resolves after the next drop, failure or ping (or at once if one happened since the last call).
    pub async fn changed(&self) {
        self.notify.notified().await
    }
}
