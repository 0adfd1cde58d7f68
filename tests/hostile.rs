//! Hostile clients over real sockets: garbage frames, huge frames, floods of tiny frames,
//! handshakes that never finish, and thousands of connect/disconnect cycles — while one
//! well-behaved session streams throughout and loses nothing, and memory stays bounded.
//!
//! The hostile clients connect from 127.0.0.2 and the well-behaved one from 127.0.0.1, so the
//! per-address limit is exercised too. `VOXFLOW_HOSTILE_CYCLES` sets the number of
//! connect/disconnect cycles (default 2000; docs/security.md reports a 10,000-cycle run).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use pipeline::testing::CountingEngine;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const HOSTILE_IP: [u8; 4] = [127, 0, 0, 2];

async fn tcp_from(ip: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ip, 0)))?;
    socket.connect(addr).await
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// A WebSocket from the hostile address, or `None` when the server refused it (e.g. 429).
async fn hostile_ws(addr: SocketAddr) -> Option<Ws> {
    let tcp = tcp_from(HOSTILE_IP, addr).await.ok()?;
    let url = format!("ws://{addr}/v1/stream");
    tokio_tungstenite::client_async(url, tcp)
        .await
        .ok()
        .map(|(ws, _)| ws)
}

/// Read until the server closes; the close code, if any.
async fn close_code(mut ws: Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A pseudo-random byte stream (xorshift), so the garbage is the same every run.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn garbage_sessions(addr: SocketAddr, count: u64) -> u64 {
    let mut closed_with_error = 0;
    for i in 0..count {
        let Some(mut ws) = hostile_ws(addr).await else {
            continue;
        };
        // Odd length: never whole LINEAR16 samples. Text: never valid JSON.
        let message = if i % 2 == 0 {
            Message::binary(garbage(i, 1 + 2 * (i as usize % 500)))
        } else {
            Message::text(String::from_utf8_lossy(&garbage(i, 300)).into_owned())
        };
        if ws.send(message).await.is_ok() && matches!(close_code(ws).await, Some(1007 | 1008)) {
            closed_with_error += 1;
        }
    }
    closed_with_error
}

async fn huge_frames(addr: SocketAddr, count: usize) -> usize {
    let mut too_big = 0;
    for _ in 0..count {
        let Some(mut ws) = hostile_ws(addr).await else {
            continue;
        };
        // Twice the configured maximum (64 KiB in this test).
        let _ = ws.send(Message::binary(vec![0u8; 128 * 1024])).await;
        if close_code(ws).await == Some(1009) {
            too_big += 1;
        }
    }
    too_big
}

async fn tiny_flood(addr: SocketAddr, frames: usize) {
    let Some(mut ws) = hostile_ws(addr).await else {
        return;
    };
    for _ in 0..frames {
        if ws.send(Message::binary(vec![1u8, 0])).await.is_err() {
            return;
        }
    }
    let _ = ws
        .send(Message::text(json!({"type": "stop"}).to_string()))
        .await;
    let _ = close_code(ws).await;
}

/// Connections that send half a request head, a byte at a time, and never finish.
async fn endless_handshakes(addr: SocketAddr, count: usize) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..count {
        tasks.push(tokio::spawn(async move {
            let Ok(mut tcp) = tcp_from(HOSTILE_IP, addr).await else {
                return false;
            };
            let started = tokio::time::Instant::now();
            for byte in b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-".repeat(10)
            {
                if tcp.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Cut by the server long before the drip would have ended.
            let mut buf = [0u8; 256];
            let cut = matches!(
                tokio::time::timeout(WAIT, tcp.read(&mut buf)).await,
                Ok(Ok(_) | Err(_))
            );
            cut && started.elapsed() < Duration::from_secs(5)
        }));
    }
    let mut cut = 0;
    for task in tasks {
        cut += usize::from(task.await.unwrap());
    }
    cut
}

/// Connect and drop: half as bare TCP, half as a WebSocket dropped without a close frame.
async fn churn(addr: SocketAddr, cycles: u64, done: Arc<AtomicU64>) {
    for i in 0..cycles {
        if i % 2 == 0 {
            drop(tcp_from(HOSTILE_IP, addr).await);
        } else {
            drop(hostile_ws(addr).await);
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_a_well_behaved_session() {
    let cycles: u64 = std::env::var("VOXFLOW_HOSTILE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut config = test_config();
    config.ingress.max_message_bytes = 64 * 1024;
    config.limits.handshake_timeout_ms = 500;
    config.limits.max_sessions_per_ip = 20;
    let (engine, _stall) = CountingEngine::new();
    let server = TestServer::start(config, Arc::new(engine)).await;
    let addr = server.addr;

    // The well-behaved session: speech at about 4x real time until the attack is over.
    let attack_over = Arc::new(AtomicBool::new(false));
    let good = {
        let attack_over = Arc::clone(&attack_over);
        let mut client = server.connect("").await;
        tokio::spawn(async move {
            let speech = speech_16k();
            let mut sent = 0u64;
            while !attack_over.load(Ordering::Relaxed) || sent == 0 {
                for chunk in speech.chunks(1_600) {
                    client.send_binary(le_bytes(chunk)).await;
                    sent += chunk.len() as u64;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            client.send_json(json!({"type": "stop"})).await;
            (sent, client.collect().await)
        })
    };

    // Warm up, then take the memory baseline.
    let done = Arc::new(AtomicU64::new(0));
    churn(addr, 200, Arc::clone(&done)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline_kib = rss_kib();

    let per_task = cycles / 4;
    let churners: Vec<_> = (0..4)
        .map(|_| tokio::spawn(churn(addr, per_task, Arc::clone(&done))))
        .collect();
    let (garbage_closed, too_big, (), (), cut) = tokio::join!(
        garbage_sessions(addr, 100),
        huge_frames(addr, 10),
        tiny_flood(addr, 5_000),
        tiny_flood(addr, 5_000),
        endless_handshakes(addr, 10),
    );
    for churner in churners {
        churner.await.unwrap();
    }
    attack_over.store(true, Ordering::Relaxed);

    let (sent, result) = good.await.unwrap();
    assert_eq!(result.error_code(), None, "{:?}", result.messages);
    assert_eq!(result.of_type("closed").len(), 1);
    assert_eq!(
        result.final_samples(),
        sent,
        "the well-behaved session lost audio"
    );
    assert!(
        garbage_closed >= 90,
        "garbage sessions closed: {garbage_closed}/100"
    );
    assert!(too_big >= 9, "huge frames refused with 1009: {too_big}/10");
    assert_eq!(cut, 10, "endless handshakes cut");
    assert_eq!(done.load(Ordering::Relaxed), 200 + 4 * per_task);

    // Everything the attack opened is gone.
    let mut active = String::new();
    for _ in 0..100 {
        let metrics = server.metrics().await;
        active = metrics
            .lines()
            .find(|l| l.starts_with("voxflow_sessions_active "))
            .unwrap_or("")
            .to_string();
        if active.ends_with(" 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active.ends_with(" 0"), "{active}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let growth_kib = rss_kib().saturating_sub(baseline_kib);
    eprintln!(
        "hostile: {} cycles, RSS baseline {} KiB, growth {} KiB",
        4 * per_task,
        baseline_kib,
        growth_kib
    );
    assert!(
        growth_kib < 16 * 1024,
        "RSS grew by {growth_kib} KiB over {cycles} cycles"
    );
}
