use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::AudioFrame;

fn frame(n: u64) -> AudioFrame {
    AudioFrame {
        samples: vec![0; 320],
        sample_rate_hz: 16_000,
        start_sample: n * 320,
        speech: true,
    }
}

fn make(policy: OverflowPolicy) -> (EdgeTx<AudioFrame>, EdgeRx<AudioFrame>, Arc<SessionShared>) {
    let session = Arc::new(SessionShared::new());
    let settings = EdgeSettings {
        capacity: 2,
        send_timeout: Duration::from_millis(50),
        overflow: policy,
    };
    let metrics = StageMetrics::new("decode");
    let (tx, rx) = edge(settings, &metrics, &metrics, &session);
    (tx, rx, session)
}

#[tokio::test(start_paused = true)]
async fn drop_newest_keeps_the_queue_and_counts_the_loss() {
    let (tx, mut rx, session) = make(OverflowPolicy::DropNewest);
    for n in 0..5 {
        tx.send(frame(n)).await.unwrap();
    }
    assert_eq!(session.drops(), (3, 60_000));
    assert_eq!(rx.recv().await.unwrap().start_sample, 0);
    assert_eq!(rx.recv().await.unwrap().start_sample, 320);
}

#[tokio::test(start_paused = true)]
async fn drop_oldest_keeps_the_newest() {
    let (tx, mut rx, session) = make(OverflowPolicy::DropOldest);
    for n in 0..5 {
        tx.send(frame(n)).await.unwrap();
    }
    assert_eq!(session.drops(), (3, 60_000));
    assert_eq!(rx.recv().await.unwrap().start_sample, 3 * 320);
    assert_eq!(rx.recv().await.unwrap().start_sample, 4 * 320);
}

#[tokio::test(start_paused = true)]
async fn close_policy_reports_overflow_after_the_timeout() {
    let (tx, _rx, session) = make(OverflowPolicy::Close);
    tx.send(frame(0)).await.unwrap();
    tx.send(frame(1)).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(tx.send(frame(2)).await, Err(EdgeError::Overflow));
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    assert_eq!(session.drops(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn block_waits_for_room_and_loses_nothing() {
    let (tx, mut rx, session) = make(OverflowPolicy::Block);
    tx.send(frame(0)).await.unwrap();
    tx.send(frame(1)).await.unwrap();
    let sender = tokio::spawn(async move {
        tx.send(frame(2)).await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        !sender.is_finished(),
        "a blocked send must keep waiting past the timeout"
    );
    assert_eq!(rx.recv().await.unwrap().start_sample, 0);
    sender.await.unwrap();
    assert_eq!(rx.recv().await.unwrap().start_sample, 320);
    assert_eq!(rx.recv().await.unwrap().start_sample, 640);
    assert_eq!(session.drops(), (0, 0));
}

#[tokio::test]
async fn dropping_the_receiver_closes_the_edge() {
    let (tx, rx, _session) = make(OverflowPolicy::Block);
    drop(rx);
    assert_eq!(tx.send(frame(0)).await, Err(EdgeError::Closed));
}

#[tokio::test(start_paused = true)]
async fn markers_are_never_dropped() {
    let session = Arc::new(SessionShared::new());
    let settings = EdgeSettings {
        capacity: 1,
        send_timeout: Duration::from_millis(5),
        overflow: OverflowPolicy::DropNewest,
    };
    let metrics = StageMetrics::new("batch");
    let (tx, mut rx) = edge::<crate::Flow<AudioFrame>>(settings, &metrics, &metrics, &session);
    tx.send_data(frame(0)).await.unwrap();
    let marker = tokio::spawn(async move { tx.send_finalize().await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rx.recv().await.is_some());
    marker.await.unwrap().unwrap();
    assert_eq!(rx.recv().await, Some(crate::Flow::Finalize));
    assert_eq!(session.drops(), (0, 0));
}
