//! The TCP connections under the gRPC channels, with bounded write coalescing.
//!
//! HTTP/2 flushes after every burst of frames, and with a hundred streams on a connection each
//! carrying a request every 20 ms, a burst is usually one stream's single request: one `writev`
//! per audio message, the largest single cost of a loaded gateway (on loopback the kernel runs
//! the receiver's side of TCP inside that call too). Holding the flush inside the connection
//! does not work: h2 flushes before it buffers each further DATA frame, so a held flush would
//! hold the whole connection to one frame per window.
//!
//! Instead each connection's socket writes are done by a small writer task. The connection
//! appends its bytes to a shared buffer and a flush only asks the writer to write. While the
//! connection is quiet (fewer flushes than one per `window`, counted over the last
//! [`RATE_WINDOWS`] windows) the writer writes each at once: holding would delay a request
//! without sharing its system call with another. While it is busy the writer writes at most once
//! per `window`, taking whatever accumulated meanwhile: a request waits at most `window`
//! (rounded up to the timer's millisecond) and the connection makes one system call per window
//! instead of one per request. (Holding whenever the last write was less than a window ago added
//! ~2 ms to a tenth of the requests of a connection carrying two or three streams.) The buffer is
//! bounded: above [`HIGH_WATER_BYTES`] writes wait for the writer (backpressure to HTTP/2). TLS,
//! when configured, runs on top, so its records coalesce the same way.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

/// Bytes held before writes wait for the writer: by then one system call carries many
/// requests, and the connection must not buffer without bound.
const HIGH_WATER_BYTES: usize = 64 * 1024;

/// The span over which the writer counts flushes to tell a busy connection from a quiet one,
/// in windows: short enough to follow load, long enough that one burst does not count as busy.
const RATE_WINDOWS: u32 = 10;

/// Capacity each of a connection's two buffers keeps between writes. A loaded connection writes
/// a few KiB per window; only a stall fills a buffer towards [`HIGH_WATER_BYTES`], and keeping
/// that much for the connection's life cost ~2 KB per session at 600 sessions (BENCHMARKS.md).
const RETAINED_BYTES: usize = 16 * 1024;

/// The connection's half of a coalesced socket: reads go straight to the socket, writes to the
/// writer task. Dropping it lets the writer write what is held, then close the socket's write
/// side.
pub struct Coalesced<R> {
    read: R,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: a flush was asked for, the buffer is full, or the connection is gone.
    wake_writer: Notify,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    flush: bool,
    /// Flushes asked for since the writer last looked at the rate.
    flushes: u64,
    /// The connection asked to shut down, or was dropped.
    closing: bool,
    /// The writer wrote everything and shut the socket's write side.
    closed: bool,
    /// The socket failed; every later write and flush reports it.
    failed: Option<(io::ErrorKind, String)>,
    /// The connection, waiting for room or for the shutdown to finish.
    waiting: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes and flags: still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn failure(&self) -> Option<io::Error> {
        let (kind, message) = self.failed.as_ref()?;
        Some(io::Error::new(*kind, message.clone()))
    }

    fn fail(&mut self, error: &io::Error) {
        self.failed = Some((error.kind(), error.to_string()));
    }

    fn check(&self) -> io::Result<()> {
        match self.failure() {
            Some(error) => Err(error),
            None if self.closed => Err(io::ErrorKind::BrokenPipe.into()),
            None => Ok(()),
        }
    }

    fn wake_connection(&mut self) {
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
    }
}

impl<R> Coalesced<R> {
    /// Wrap a socket split into `read` and `write`; spawns the writer task.
    pub fn new<W>(read: R, write: W, window: Duration) -> Coalesced<R>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
        });
        tokio::spawn(writer(write, Arc::clone(&shared), window));
        Coalesced { read, shared }
    }

    fn append(&self, cx: &mut Context<'_>, slices: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let mut state = self.shared.lock();
        state.check()?;
        if state.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if state.buf.len() >= HIGH_WATER_BYTES {
            state.waiting = Some(cx.waker().clone());
            drop(state);
            self.shared.wake_writer.notify_one();
            return Poll::Pending;
        }
        // A partial write past the mark keeps the buffer bounded; the caller writes the rest.
        let mut room = HIGH_WATER_BYTES - state.buf.len();
        let mut n = 0;
        for slice in slices {
            let take = slice.len().min(room);
            state.buf.extend_from_slice(&slice[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }
}

impl<R> Drop for Coalesced<R> {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake_writer.notify_one();
    }
}

/// Write what the connection hands over, at most once per `window` while it is busy.
async fn writer<W: AsyncWrite + Unpin>(mut socket: W, shared: Arc<Shared>, window: Duration) {
    let mut out = Vec::new();
    let mut last_write: Option<Instant> = None;
    let mut busy = false;
    let mut rate_since = Instant::now();
    loop {
        // Wait for something to do. `Notify` keeps a wake-up that arrives between the check
        // and the wait.
        let closing = loop {
            {
                let state = shared.lock();
                if state.flush || state.closing || state.buf.len() >= HIGH_WATER_BYTES {
                    break state.closing;
                }
            }
            shared.wake_writer.notified().await;
        };
        let now = Instant::now();
        if now >= rate_since + window * RATE_WINDOWS {
            let flushes = std::mem::take(&mut shared.lock().flushes);
            busy = u128::from(flushes) * window.as_nanos() >= (now - rate_since).as_nanos();
            rate_since = now;
        }
        if busy
            && !closing
            && let Some(last) = last_write
        {
            let until = last + window;
            if now < until && shared.lock().buf.len() < HIGH_WATER_BYTES {
                sleep_until(until).await;
            }
        }
        let closing = {
            let mut state = shared.lock();
            std::mem::swap(&mut out, &mut state.buf);
            state.flush = false;
            state.wake_connection();
            state.closing
        };
        let mut result = Ok(());
        if !out.is_empty() {
            result = socket.write_all(&out).await;
            last_write = Some(Instant::now());
        }
        if result.is_ok() {
            result = socket.flush().await;
        }
        // A buffer grown by a burst is given back rather than held for the connection's life.
        out.clear();
        out.shrink_to(RETAINED_BYTES);
        if let Err(error) = result {
            let mut state = shared.lock();
            state.fail(&error);
            state.wake_connection();
            return;
        }
        if closing && shared.lock().buf.is_empty() {
            let result = socket.shutdown().await;
            let mut state = shared.lock();
            if let Err(error) = result {
                state.fail(&error);
            }
            state.closed = true;
            state.wake_connection();
            return;
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Coalesced<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for Coalesced<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.append(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Asks the writer to write; does not wait for it (that is the point).
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        state.check()?;
        if !state.buf.is_empty() {
            state.flush = true;
            state.flushes += 1;
            drop(state);
            self.shared.wake_writer.notify_one();
        }
        Poll::Ready(Ok(()))
    }

    /// Waits until the writer wrote everything and shut the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.shared.lock();
        if let Some(error) = state.failure() {
            return Poll::Ready(Err(error));
        }
        if state.closed {
            return Poll::Ready(Ok(()));
        }
        state.closing = true;
        state.waiting = Some(cx.waker().clone());
        drop(state);
        self.shared.wake_writer.notify_one();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Each write the socket took, and when.
    type Writes = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

    /// Records each write the "socket" takes, and when, and whether it was shut down; a
    /// broken one fails every write.
    #[derive(Clone, Default)]
    struct Socket {
        writes: Writes,
        shut: Arc<Mutex<bool>>,
        broken: bool,
    }

    impl Socket {
        fn broken() -> Socket {
            Socket {
                broken: true,
                ..Socket::default()
            }
        }

        fn writes(&self) -> Vec<Vec<u8>> {
            let writes = self.writes.lock().unwrap();
            writes.iter().map(|(_, w)| w.clone()).collect()
        }

        fn times(&self) -> Vec<Instant> {
            self.writes
                .lock()
                .unwrap()
                .iter()
                .map(|(t, _)| *t)
                .collect()
        }

        fn shut(&self) -> bool {
            *self.shut.lock().unwrap()
        }
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            self.writes
                .lock()
                .unwrap()
                .push((Instant::now(), data.to_vec()));
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            *self.shut.lock().unwrap() = true;
            Poll::Ready(Ok(()))
        }
    }

    const WINDOW: Duration = Duration::from_millis(2);

    /// Let the writer task run (paused time does not advance while it has work).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Write and flush `data`, then let the writer run.
    async fn send(io: &mut Coalesced<tokio::io::Empty>, data: &[u8]) {
        io.write_all(data).await.unwrap();
        io.flush().await.unwrap();
        settle().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_writes_at_once_and_a_busy_one_once_per_window() {
        let socket = Socket::default();
        let mut io = Coalesced::new(tokio::io::empty(), socket.clone(), WINDOW);
        let started = Instant::now();
        send(&mut io, b"a").await;
        // Quiet: a second request within the window is not held either.
        tokio::time::advance(Duration::from_micros(500)).await;
        send(&mut io, b"b").await;
        assert_eq!(socket.writes(), [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(
            socket.times(),
            [started, started + Duration::from_micros(500)]
        );

        // Busy: four flushes per window for longer than the rate is counted over.
        let step = WINDOW / 4;
        let flushes = 4 * RATE_WINDOWS as usize * 4;
        for _ in 0..flushes {
            tokio::time::advance(step).await;
            send(&mut io, b"x").await;
        }
        tokio::time::sleep(WINDOW * 2).await;
        settle().await;
        let times = socket.times();
        let writes = socket.writes();
        assert_eq!(writes.concat().len(), 2 + flushes, "every byte once");
        // Once the rate shows the connection busy, writes are a window apart and carry several
        // requests.
        let last = &times[times.len() - 6..];
        assert!(
            last.windows(2).all(|w| w[1] - w[0] >= WINDOW),
            "busy: writes at most once per window ({last:?})"
        );
        // (The last write takes the request flushed after the window before it.)
        let held = &writes[writes.len() - 6..writes.len() - 1];
        assert!(held.iter().all(|w| w.len() >= 2), "{held:?}");
        assert!(writes.len() < 2 + flushes / 2, "{} writes", writes.len());

        // Quiet again: straight out, once the rate has been counted afresh.
        tokio::time::advance(WINDOW * RATE_WINDOWS * 3).await;
        send(&mut io, b"d").await;
        let before = Instant::now();
        tokio::time::advance(Duration::from_micros(300)).await;
        send(&mut io, b"e").await;
        let times = socket.times();
        let writes = socket.writes();
        assert_eq!(writes[writes.len() - 2..], [b"d".to_vec(), b"e".to_vec()]);
        assert_eq!(
            times[times.len() - 1],
            before + Duration::from_micros(300),
            "written at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn writes_without_a_flush_wait_and_a_full_buffer_pushes_back() {
        let socket = Socket::default();
        let mut io = Coalesced::new(tokio::io::empty(), socket.clone(), WINDOW);
        io.write_all(b"x").await.unwrap();
        tokio::time::sleep(WINDOW * 5).await;
        assert!(
            socket.writes().is_empty(),
            "nothing is written before a flush"
        );

        // More than the high-water mark: write_all completes only because the writer drains.
        let big = vec![7u8; 3 * HIGH_WATER_BYTES];
        io.write_all(&big).await.unwrap();
        io.flush().await.unwrap();
        tokio::time::sleep(WINDOW * 5).await;
        let total: usize = socket.writes().iter().map(Vec::len).sum();
        assert_eq!(total, 1 + big.len(), "every byte reached the socket once");
        assert!(
            socket
                .writes()
                .iter()
                .all(|w| w.len() <= 2 * HIGH_WATER_BYTES)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_and_drop_write_what_is_held() {
        let socket = Socket::default();
        let mut io = Coalesced::new(tokio::io::empty(), socket.clone(), WINDOW);
        io.write_all(b"first").await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"last").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(socket.writes().concat(), b"firstlast");
        assert!(socket.shut());

        let socket = Socket::default();
        let mut io = Coalesced::new(tokio::io::empty(), socket.clone(), WINDOW);
        io.write_all(b"unflushed").await.unwrap();
        drop(io);
        tokio::time::sleep(WINDOW).await;
        assert_eq!(socket.writes().concat(), b"unflushed");
        assert!(socket.shut());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_socket_fails_later_writes() {
        let mut io = Coalesced::new(tokio::io::empty(), Socket::broken(), WINDOW);
        io.write_all(b"lost").await.unwrap();
        io.flush().await.unwrap();
        settle().await;
        let error = io.write_all(b"more").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            io.flush().await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }
}
