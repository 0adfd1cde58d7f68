//! Bounded, timed, accounted channels between stages.
//!
//! A send tries the queue first (`try_send`); only when it is full does the sender wait, up to
//! the edge's send timeout, and the wait is recorded in `voxflow_stage_send_blocked_seconds`.
//! When the timeout expires the edge's [`OverflowPolicy`] decides. Every dropped item is counted
//! under the sending stage and recorded in the session so the client is told.

use std::future::poll_fn;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::metrics::{DropReason, ErrorKind, StageMetrics};
use crate::session::SessionShared;
use crate::{AudioLength, Flow};

/// What a full edge does once its send timeout has expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Keep waiting: backpressure travels upstream to the client's TCP socket. Nothing is lost.
    Block,
    /// Discard the oldest queued item to make room (audio lost, counted, client told).
    DropOldest,
    /// Discard the item being sent (audio lost, counted, client told).
    DropNewest,
    /// End the session with an `overloaded` error (close 1013).
    Close,
}

impl OverflowPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::Block => "block",
            OverflowPolicy::DropOldest => "drop_oldest",
            OverflowPolicy::DropNewest => "drop_newest",
            OverflowPolicy::Close => "close",
        }
    }
}

/// Validated settings of one edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Items the queue holds. 0: no queue; the receiving stage runs in the sending stage's
    /// task, and the timeout and policy apply to waiting for the stage after it.
    pub capacity: usize,
    pub send_timeout: Duration,
    pub overflow: OverflowPolicy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EdgeError {
    /// The receiving stage has gone (the session is ending).
    #[error("the downstream stage has stopped")]
    Closed,
    /// The edge's policy is `close` and the queue stayed full past the send timeout.
    #[error("queue full for longer than the send timeout")]
    Overflow,
}

impl EdgeSettings {
    /// The queue's capacity; `None` when the edge has none (capacity 0).
    pub fn queue(&self) -> Option<NonZeroUsize> {
        NonZeroUsize::new(self.capacity)
    }
}

/// Create an edge with a queue. `from` is the sending stage's metrics; `to` is the receiving
/// stage's. A capacity of 0 is taken as 1: a caller with no queue runs the stage inline.
pub fn edge<T>(
    settings: EdgeSettings,
    from: &StageMetrics,
    to: &StageMetrics,
    session: &Arc<SessionShared>,
) -> (EdgeTx<T>, EdgeRx<T>) {
    let capacity = settings.capacity.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    // The sender needs the receiver only to evict under `drop_oldest`; the lock is uncontended
    // because the receiver never holds it across an await.
    let rx = Arc::new(Mutex::new(rx));
    to.queue_capacity.increment(capacity as f64);
    let edge_tx = EdgeTx {
        tx,
        rx: Arc::clone(&rx),
        settings,
        from: from.clone(),
        to: to.clone(),
        session: Arc::clone(session),
    };
    let edge_rx = EdgeRx {
        rx,
        capacity,
        metrics: to.clone(),
    };
    (edge_tx, edge_rx)
}

/// The sending half of an edge.
pub struct EdgeTx<T> {
    tx: mpsc::Sender<T>,
    rx: Arc<Mutex<mpsc::Receiver<T>>>,
    settings: EdgeSettings,
    from: StageMetrics,
    /// The receiving stage's, for its queue depth.
    to: StageMetrics,
    session: Arc<SessionShared>,
}

impl<T: AudioLength> EdgeTx<T> {
    /// Send `item`, applying the edge's overflow policy if the queue stays full.
    ///
    /// `Ok(())` also covers an item dropped by policy: that loss is already counted and
    /// recorded in the session.
    ///
    /// # Errors
    /// [`EdgeError::Closed`] when the receiver is gone; [`EdgeError::Overflow`] when the policy
    /// is `close` and the timeout expired (the caller ends the session).
    pub async fn send(&self, item: T) -> Result<(), EdgeError> {
        match self.tx.try_send(item) {
            Ok(()) => {
                self.sent();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EdgeError::Closed),
            Err(mpsc::error::TrySendError::Full(item)) => self.send_slow(item, false).await,
        }
    }

    /// Send an item that must not be dropped (markers): waits like `block` whatever the policy.
    pub async fn send_reliable(&self, item: T) -> Result<(), EdgeError> {
        match self.tx.try_send(item) {
            Ok(()) => {
                self.sent();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EdgeError::Closed),
            Err(mpsc::error::TrySendError::Full(item)) => self.send_slow(item, true).await,
        }
    }

    async fn send_slow(&self, item: T, reliable: bool) -> Result<(), EdgeError> {
        let started = Instant::now();
        let result = self.wait_and_send(item, reliable).await;
        self.from
            .send_blocked
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn wait_and_send(&self, item: T, reliable: bool) -> Result<(), EdgeError> {
        let policy = if reliable {
            OverflowPolicy::Block
        } else {
            self.settings.overflow
        };
        if policy == OverflowPolicy::Block {
            let permit = self.tx.reserve().await.map_err(|_| EdgeError::Closed)?;
            permit.send(item);
            self.sent();
            return Ok(());
        }
        match timeout(self.settings.send_timeout, self.tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(item);
                self.sent();
                Ok(())
            }
            Ok(Err(_)) => Err(EdgeError::Closed),
            Err(_elapsed) => self.overflow(item, policy),
        }
    }

    fn overflow(&self, item: T, policy: OverflowPolicy) -> Result<(), EdgeError> {
        match policy {
            OverflowPolicy::DropNewest | OverflowPolicy::Block => {
                self.drop_item(&item, DropReason::OverflowNewest);
                Ok(())
            }
            OverflowPolicy::DropOldest => {
                let evicted = self.rx.lock().unwrap_or_else(|e| e.into_inner()).try_recv();
                if let Ok(old) = evicted {
                    self.to.queue_depth(-1);
                    self.drop_item(&old, DropReason::OverflowOldest);
                }
                match self.tx.try_send(item) {
                    Ok(()) => {
                        self.sent();
                        Ok(())
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(EdgeError::Closed),
                    // The receiver drained and another sender refilled it: lose the new item.
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        self.drop_item(&item, DropReason::OverflowNewest);
                        Ok(())
                    }
                }
            }
            OverflowPolicy::Close => {
                self.from.error(ErrorKind::Overflow);
                Err(EdgeError::Overflow)
            }
        }
    }

    fn sent(&self) {
        self.from.sent(1);
        self.to.queue_depth(1);
    }

    fn drop_item(&self, item: &T, reason: DropReason) {
        let audio_us = item.audio_us();
        self.from.dropped(reason, audio_us);
        self.session.record_drop(audio_us);
        tracing::trace!(
            stage = self.from.stage,
            reason = reason.as_str(),
            audio_us,
            "Dropped an item."
        );
    }

    /// Wait for room on the queue (no timeout, no policy): for stages that hold data back while
    /// downstream is busy and send it the moment it is not.
    ///
    /// # Errors
    /// [`EdgeError::Closed`] when the receiver is gone.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, EdgeError> {
        let permit = self.tx.reserve().await.map_err(|_| EdgeError::Closed)?;
        Ok(Permit { permit, edge: self })
    }

    /// Whether an item sent now would be queued without waiting.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    pub fn settings(&self) -> EdgeSettings {
        self.settings
    }
}

impl<T: AudioLength> EdgeTx<Flow<T>> {
    /// Send a data item under the edge's policy.
    pub async fn send_data(&self, item: T) -> Result<(), EdgeError> {
        self.send(Flow::Data(item)).await
    }

    /// Send a `Finalize` marker; markers are never dropped.
    pub async fn send_finalize(&self) -> Result<(), EdgeError> {
        self.send_reliable(Flow::Finalize).await
    }
}

/// What came of waiting for a stage that runs without a queue (see [`wait_for_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Send now.
    Ready,
    /// The item was dropped by the edge's policy (counted and recorded in the session).
    Dropped,
}

/// Wait for room in a stage that runs in the sender's task (an edge of capacity 0), as an edge
/// waits for room in its queue: up to the send timeout (recorded as time blocked), then the
/// edge's policy. `ready` resolves once the stage can take an item; `audio_us` is what the
/// item carries, for the drop count. Markers (`reliable`) always wait.
///
/// With no queue there is nothing older to evict: `drop_oldest` drops the item being sent.
///
/// # Errors
/// [`EdgeError::Closed`] when `ready` says the stage has gone; [`EdgeError::Overflow`] when the
/// policy is `close` and the timeout expired.
pub async fn wait_for_room(
    settings: &EdgeSettings,
    from: &StageMetrics,
    session: &SessionShared,
    audio_us: u64,
    reliable: bool,
    ready: impl std::future::Future<Output = Result<(), EdgeError>>,
) -> Result<Room, EdgeError> {
    let started = Instant::now();
    let waited = if reliable || settings.overflow == OverflowPolicy::Block {
        Ok(ready.await)
    } else {
        timeout(settings.send_timeout, ready).await
    };
    from.send_blocked.record(started.elapsed().as_secs_f64());
    match waited {
        Ok(Ok(())) => Ok(Room::Ready),
        Ok(Err(error)) => Err(error),
        Err(_elapsed) if settings.overflow == OverflowPolicy::Close => {
            from.error(ErrorKind::Overflow);
            Err(EdgeError::Overflow)
        }
        Err(_elapsed) => {
            let reason = if settings.overflow == OverflowPolicy::DropOldest {
                DropReason::OverflowOldest
            } else {
                DropReason::OverflowNewest
            };
            from.dropped(reason, audio_us);
            session.record_drop(audio_us);
            Ok(Room::Dropped)
        }
    }
}

/// Room for one item on an edge, from [`EdgeTx::reserve`].
pub struct Permit<'a, T> {
    permit: mpsc::Permit<'a, T>,
    edge: &'a EdgeTx<T>,
}

impl<T: AudioLength> Permit<'_, T> {
    pub fn send(self, item: T) {
        self.permit.send(item);
        self.edge.sent();
    }
}

/// The receiving half of an edge.
pub struct EdgeRx<T> {
    rx: Arc<Mutex<mpsc::Receiver<T>>>,
    capacity: usize,
    metrics: StageMetrics,
}

impl<T> EdgeRx<T> {
    /// The next item, or `None` once every sender has gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let item = poll_fn(|cx| {
            self.rx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_recv(cx)
        })
        .await;
        if item.is_some() {
            self.metrics.received(1);
            self.metrics.queue_depth(-1);
        }
        item
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn metrics(&self) -> &StageMetrics {
        &self.metrics
    }
}

impl<T: AudioLength> EdgeRx<T> {
    /// Stop accepting items and discard what is queued, counting it. For a stage that ends
    /// before its input does (a failed session); senders then see [`EdgeError::Closed`].
    pub fn close(&mut self) {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        rx.close();
        while let Ok(item) = rx.try_recv() {
            self.metrics.queue_depth(-1);
            self.metrics.dropped(DropReason::Closed, item.audio_us());
        }
    }
}

impl<T> Drop for EdgeRx<T> {
    fn drop(&mut self) {
        // The sender shares the receiver (for eviction), so close it explicitly: senders must
        // see `Closed` rather than fill a queue nobody reads.
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        rx.close();
        let mut left = 0usize;
        while rx.try_recv().is_ok() {
            left += 1;
        }
        self.metrics.queue_depth(-(left as i64));
        if left > 0 {
            tracing::debug!(
                stage = self.metrics.stage,
                left,
                "Input queue discarded at end of session."
            );
        }
        self.metrics.queue_capacity.decrement(self.capacity as f64);
    }
}

#[cfg(test)]
mod tests;
