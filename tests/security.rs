//! Authentication, admission limits and TLS over real sockets on loopback: each method
//! accepted, each failure refused before the upgrade and counted, each limit tripped and
//! reported, `wss://` with a certificate replaced mid-session, and no secret in the logs.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use pipeline::testing::CountingEngine;
use serde_json::json;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use voxflow::Config;
use voxflow::config::{ApiKeyConfig, AuthMode};

const API_KEY: &str = "vfk_test_4f1c9a0e7b2d45f6a8c3e1d09b7a6f52";
const HS_SECRET: &str = "hs256-test-secret-0123456789abcdef-0123456789";

// ---------------------------------------------------------------------------------------------
// Log capture: every test's logs, checked for secrets.

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        captured
    })
}

fn assert_not_logged(secrets: &[&str]) {
    let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    assert!(
        text.contains("Upgrade"),
        "the capture sees the server's logs"
    );
    for secret in secrets {
        assert!(!text.contains(secret), "a secret reached the logs");
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

async fn start(config: Config) -> TestServer {
    logs();
    let (engine, _stall) = CountingEngine::new();
    TestServer::start(config, Arc::new(engine)).await
}

/// Send an upgrade request by hand; return the status, the response head, and the stream
/// (still open when the server said 101).
async fn upgrade(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "GET /v1/stream{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("server answers")
            .unwrap();
        assert_eq!(n, 1, "server closed before answering");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head, stream)
}

/// `voxflow_sessions_refused_total` by reason.
async fn refused(server: &TestServer) -> HashMap<String, u64> {
    let text = server.metrics().await;
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("voxflow_sessions_refused_total{reason=\"")?;
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

async fn assert_counted(server: &TestServer, before: &HashMap<String, u64>, reason: &str) {
    let after = refused(server).await;
    let was = before.get(reason).copied().unwrap_or(0);
    assert!(
        after.get(reason).copied().unwrap_or(0) > was,
        "refusal {reason} was not counted: {after:?}"
    );
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn temp_file(name: &str, contents: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("voxflow-security-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}

/// Stream `samples` in 100 ms binary frames, stop, and return what the server said.
async fn stream_and_stop(mut client: Client, samples: &[i16]) -> Transcript {
    for chunk in samples.chunks(1_600) {
        client.send_binary(le_bytes(chunk)).await;
    }
    client.send_json(json!({"type": "stop"})).await;
    client.collect().await
}

// ---------------------------------------------------------------------------------------------
// API keys.

fn api_key_config(max_sessions: usize) -> Config {
    let mut config = test_config();
    config.auth.mode = vec![AuthMode::ApiKey];
    config.auth.api_keys = vec![ApiKeyConfig {
        id: "team-a".into(),
        sha256: sha256_hex(API_KEY),
        max_sessions,
    }];
    config
}

#[tokio::test]
async fn api_keys_are_accepted_from_each_place_and_failures_are_refused() {
    let server = start(api_key_config(0)).await;
    let bearer = format!("Bearer {API_KEY}");
    let protocol = format!("voxflow, bearer.{API_KEY}");
    let (status, _, _) = upgrade(server.addr, "", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 101, "Authorization header");
    let (status, _, _) = upgrade(server.addr, &format!("?token={API_KEY}"), &[]).await;
    assert_eq!(status, 101, "token query parameter");
    let (status, head, _) =
        upgrade(server.addr, "", &[("Sec-WebSocket-Protocol", &protocol)]).await;
    assert_eq!(status, 101, "subprotocol");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: voxflow\r\n"),
        "the chosen subprotocol is echoed, not the key: {head}"
    );

    // A real session with the key streams audio end to end.
    let (ws, _) = tokio_tungstenite::connect_async(server.url(&format!("token={API_KEY}")))
        .await
        .unwrap();
    let samples = speech_16k();
    let result = stream_and_stop(Client { ws }, &samples).await;
    assert_eq!(result.final_samples(), samples.len() as u64);

    for (query, headers, reason) in [
        ("", vec![], "auth_missing"),
        ("?token=wrong-key", vec![], "auth_invalid"),
        (
            "",
            vec![("Authorization", "Bearer wrong-key")],
            "auth_invalid",
        ),
        (
            "",
            vec![("Sec-WebSocket-Protocol", "voxflow, bearer.wrong")],
            "auth_invalid",
        ),
    ] {
        let before = refused(&server).await;
        let (status, head, _) = upgrade(server.addr, query, &headers).await;
        assert_eq!(status, 401, "{reason}: {head}");
        assert!(head.contains("www-authenticate: Bearer"), "{head}");
        assert_counted(&server, &before, reason).await;
    }
    assert_not_logged(&[API_KEY, "wrong-key"]);
}

#[tokio::test]
async fn per_key_limit_refuses_with_429_and_frees_on_close() {
    let server = start(api_key_config(1)).await;
    let bearer = format!("Bearer {API_KEY}");
    let first = upgrade(server.addr, "", &[("Authorization", &bearer)]).await;
    assert_eq!(first.0, 101);
    let before = refused(&server).await;
    let (status, head, _) = upgrade(server.addr, "", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_counted(&server, &before, "per_key").await;
    drop(first);
    // The seat comes back once the first session notices its client is gone.
    let mut status = 0;
    for _ in 0..100 {
        status = upgrade(server.addr, "", &[("Authorization", &bearer)])
            .await
            .0;
        if status == 101 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 101);
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let mut config = test_config();
    config.auth.allowed_origins = vec!["https://app.example".into()];
    let server = start(config).await;
    let before = refused(&server).await;
    let (status, _, _) = upgrade(server.addr, "", &[("Origin", "https://evil.example")]).await;
    assert_eq!(status, 403);
    assert_counted(&server, &before, "origin").await;
    let (status, _, _) = upgrade(server.addr, "", &[("Origin", "https://app.example")]).await;
    assert_eq!(status, 101);
    // Non-browser clients send no Origin.
    assert_eq!(upgrade(server.addr, "", &[]).await.0, 101);
}

// ---------------------------------------------------------------------------------------------
// JWT.

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a str,
    iss: &'a str,
    exp: u64,
    nbf: u64,
}

fn good_claims() -> Claims<'static> {
    Claims {
        sub: "user-1",
        aud: "voxflow",
        iss: "https://issuer.test",
        exp: now() + 600,
        nbf: now() - 10,
    }
}

fn jwt_config(jwks: Option<String>) -> Config {
    let mut config = test_config();
    config.auth.mode = vec![AuthMode::Jwt];
    config.auth.jwt.hs256_secret_file = temp_file("hs256.secret", HS_SECRET.as_bytes());
    config.auth.jwt.jwks_file = jwks.unwrap_or_default();
    config.auth.jwt.audiences = vec!["voxflow".into()];
    config.auth.jwt.issuers = vec!["https://issuer.test".into()];
    config.auth.jwt.leeway_secs = 0;
    config
}

fn hs256(claims: &Claims, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn hs256_tokens_are_checked_for_signature_and_claims() {
    let server = start(jwt_config(None)).await;
    let good = hs256(&good_claims(), HS_SECRET);
    let bearer = format!("Bearer {good}");
    assert_eq!(
        upgrade(server.addr, "", &[("Authorization", &bearer)])
            .await
            .0,
        101
    );
    assert_eq!(
        upgrade(server.addr, &format!("?token={good}"), &[]).await.0,
        101
    );
    let expired = hs256(
        &Claims {
            exp: now() - 60,
            ..good_claims()
        },
        HS_SECRET,
    );
    let forged = hs256(&good_claims(), "another-secret-of-sufficient-length-0123");
    let wrong_audience = hs256(
        &Claims {
            aud: "someone-else",
            ..good_claims()
        },
        HS_SECRET,
    );
    let wrong_issuer = hs256(
        &Claims {
            iss: "https://evil.test",
            ..good_claims()
        },
        HS_SECRET,
    );
    let not_yet = hs256(
        &Claims {
            nbf: now() + 600,
            ..good_claims()
        },
        HS_SECRET,
    );
    let mut tampered = good.clone();
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    let cases = [
        (None, "auth_missing"),
        (Some(expired.as_str()), "auth_expired"),
        (Some(forged.as_str()), "auth_invalid"),
        (Some(tampered.as_str()), "auth_invalid"),
        (Some("not.a.jwt"), "auth_invalid"),
        (Some(wrong_audience.as_str()), "auth_claims"),
        (Some(wrong_issuer.as_str()), "auth_claims"),
        (Some(not_yet.as_str()), "auth_claims"),
    ];
    for (token, reason) in cases {
        let before = refused(&server).await;
        let header = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("Authorization", h)])
            .unwrap_or_default();
        let (status, head, _) = upgrade(server.addr, "", &headers).await;
        assert_eq!(status, 401, "{reason}: {head}");
        assert_counted(&server, &before, reason).await;
    }
    assert_not_logged(&[&good, &expired, &forged, HS_SECRET]);
}

#[tokio::test]
async fn es256_and_rs256_tokens_verify_against_the_jwks() {
    // ES256: a fresh P-256 key; its public half goes into the JWKS.
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec_key = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
    let rsa_key = EncodingKey::from_rsa_pem(
        &std::fs::read(fixture("jwt-rs256-test-key.pem")).expect("RSA test key fixture"),
    )
    .unwrap();
    let mut ec_jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&ec_key, Algorithm::ES256).unwrap();
    ec_jwk.common.key_id = Some("ec-1".into());
    let mut rsa_jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa_key, Algorithm::RS256).unwrap();
    rsa_jwk.common.key_id = Some("rsa-1".into());
    let jwks = json!({ "keys": [ec_jwk, rsa_jwk] });
    let jwks_path = temp_file("jwks.json", jwks.to_string().as_bytes());
    let server = start(jwt_config(Some(jwks_path))).await;

    let sign = |alg, kid: &str, key: &EncodingKey, claims: &Claims| {
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, claims, key).unwrap()
    };
    for (alg, kid, key) in [
        (Algorithm::ES256, "ec-1", &ec_key),
        (Algorithm::RS256, "rsa-1", &rsa_key),
    ] {
        let token = sign(alg, kid, key, &good_claims());
        let protocol = format!("voxflow, bearer.{token}");
        let (status, head, _) =
            upgrade(server.addr, "", &[("Sec-WebSocket-Protocol", &protocol)]).await;
        assert_eq!(status, 101, "{alg:?}: {head}");
        // Wrong audience, signed correctly.
        let wrong = sign(
            alg,
            kid,
            key,
            &Claims {
                aud: "other",
                ..good_claims()
            },
        );
        let before = refused(&server).await;
        let bearer = format!("Bearer {wrong}");
        assert_eq!(
            upgrade(server.addr, "", &[("Authorization", &bearer)])
                .await
                .0,
            401
        );
        assert_counted(&server, &before, "auth_claims").await;
    }
    // An EC token presented under the RSA key's id, and an HS256 token made with the RSA
    // public key as its secret (algorithm confusion): both are bad signatures.
    let before = refused(&server).await;
    let confused = sign(Algorithm::ES256, "rsa-1", &ec_key, &good_claims());
    let bearer = format!("Bearer {confused}");
    assert_eq!(
        upgrade(server.addr, "", &[("Authorization", &bearer)])
            .await
            .0,
        401
    );
    assert_counted(&server, &before, "auth_invalid").await;
    let hs = hs256(&good_claims(), &jwks.to_string());
    let bearer = format!("Bearer {hs}");
    assert_eq!(
        upgrade(server.addr, "", &[("Authorization", &bearer)])
            .await
            .0,
        401
    );
}

// ---------------------------------------------------------------------------------------------
// Admission limits.

#[tokio::test]
async fn global_and_per_ip_limits_refuse_before_the_upgrade() {
    let mut config = test_config();
    config.limits.max_sessions = 2;
    config.limits.max_sessions_per_ip = 2;
    config.limits.retry_after_ms = 2_500;
    let server = start(config).await;
    let a = server.connect("").await;
    let _b = server.connect("").await;
    let before = refused(&server).await;
    let (status, head, _) = upgrade(server.addr, "", &[]).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 3"), "{head}");
    assert_counted(&server, &before, "capacity").await;
    drop(a);

    let mut config = test_config();
    config.limits.max_sessions_per_ip = 1;
    let server = start(config).await;
    let _a = server.connect("").await;
    let before = refused(&server).await;
    let (status, head, _) = upgrade(server.addr, "", &[]).await;
    assert_eq!(status, 429, "{head}");
    assert_counted(&server, &before, "per_ip").await;
}

#[tokio::test]
async fn a_session_at_its_time_limit_drains_and_closes_with_1013() {
    let mut config = test_config();
    config.limits.max_session_duration_ms = 600;
    let server = start(config).await;
    let mut client = server.connect("").await;
    let samples = speech_16k();
    // Real-time pacing for longer than the limit.
    let mut sent = 0u64;
    for chunk in samples.chunks(1_600).take(12) {
        if client
            .ws
            .send(Message::binary(le_bytes(chunk)))
            .await
            .is_err()
        {
            break;
        }
        sent += chunk.len() as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = client.collect().await;
    let closed = result.of_type("closed");
    assert_eq!(closed.len(), 1, "{:?}", result.messages);
    assert_eq!(closed[0]["reason"], "max_duration");
    assert_eq!(result.close_code(), Some(1013));
    // Everything read before the limit was transcribed.
    assert!(result.final_samples() > 0 && result.final_samples() <= sent);
}

#[tokio::test]
async fn silent_and_slow_handshakes_are_cut() {
    let mut config = test_config();
    config.limits.handshake_timeout_ms = 300;
    let server = start(config).await;
    let before = refused(&server).await;
    // Silent.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Slowloris: one header byte every 100 ms, never finishing.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let drip = async {
        for byte in b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if slow.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    drip.await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the server closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the server closes a slow connection");
    // Either closed outright or answered 408 and closed.
    if let Ok(n) = n
        && n > 0
    {
        assert!(String::from_utf8_lossy(&buf[..n]).contains("408"));
    }
    assert_counted(&server, &before, "handshake_timeout").await;
    // A kept-alive connection idling after a plain request is cut too.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "the idle connection is closed");
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(2));
    // A prompt client still gets in.
    let _ok = server.connect("").await;
}

// ---------------------------------------------------------------------------------------------
// TLS.

struct Pki {
    cert_pem: String,
    key_pem: String,
}

fn self_signed() -> Pki {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    Pki {
        cert_pem: cert.cert.pem(),
        key_pem: cert.key_pair.serialize_pem(),
    }
}

fn connector(trusted: &Pki) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trusted.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type TlsWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn wss_connect(addr: SocketAddr, trusted: &Pki) -> Result<TlsWs, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector(trusted)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/stream", tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

#[tokio::test]
async fn wss_serves_and_a_new_certificate_does_not_drop_sessions() {
    let first = self_signed();
    let cert_path = temp_file("tls-cert.pem", first.cert_pem.as_bytes());
    let key_path = temp_file("tls-key.pem", first.key_pem.as_bytes());
    let mut config = test_config();
    config.server.tls.cert_path = cert_path.clone();
    config.server.tls.key_path = key_path.clone();
    config.server.tls.reload_interval_ms = 100;
    let server = start(config).await;

    // Plain HTTP on the TLS port is not served.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // A session under the first certificate streams across the rotation.
    let mut ws = wss_connect(server.addr, &first)
        .await
        .expect("wss connects");
    let samples = speech_16k();
    let (before, after) = samples.split_at(samples.len() / 2);
    for chunk in before.chunks(1_600) {
        futures::SinkExt::send(&mut ws, Message::binary(le_bytes(chunk)))
            .await
            .unwrap();
    }

    let second = self_signed();
    // Key first, then certificate: a reload between the two must not serve a mismatched pair.
    std::fs::write(&key_path, second.key_pem.as_bytes()).unwrap();
    std::fs::File::create(&cert_path)
        .unwrap()
        .write_all(second.cert_pem.as_bytes())
        .unwrap();
    let mut rotated = false;
    for _ in 0..100 {
        if wss_connect(server.addr, &second).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new certificate is served within 5 s");
    assert!(
        wss_connect(server.addr, &first).await.is_err(),
        "the old certificate is no longer served"
    );

    for chunk in after.chunks(1_600) {
        futures::SinkExt::send(&mut ws, Message::binary(le_bytes(chunk)))
            .await
            .unwrap();
    }
    futures::SinkExt::send(&mut ws, Message::text(json!({"type": "stop"}).to_string()))
        .await
        .unwrap();
    let mut samples_final = 0;
    let mut closed = false;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(WAIT, ws.next()).await {
        if let Message::Text(text) = message {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            if value["type"] == "transcript" && value["is_final"] == true {
                samples_final +=
                    pipeline::testing::parse_counts(value["transcript"].as_str().unwrap())
                        .unwrap()
                        .0;
            }
            closed |= value["type"] == "closed";
        }
    }
    assert!(closed);
    assert_eq!(
        samples_final,
        samples.len() as u64,
        "no audio lost across the rotation"
    );
}

#[tokio::test]
async fn sighup_reloads_the_certificate_at_once() {
    let first = self_signed();
    let cert_path = temp_file("hup-cert.pem", first.cert_pem.as_bytes());
    let key_path = temp_file("hup-key.pem", first.key_pem.as_bytes());
    let mut config = test_config();
    config.server.tls.cert_path = cert_path.clone();
    config.server.tls.key_path = key_path.clone();
    // No polling within the test's lifetime: only the signal can reload.
    config.server.tls.reload_interval_ms = 3_600_000;
    let server = start(config).await;
    assert!(wss_connect(server.addr, &first).await.is_ok());
    let second = self_signed();
    std::fs::write(&key_path, second.key_pem.as_bytes()).unwrap();
    std::fs::write(&cert_path, second.cert_pem.as_bytes()).unwrap();
    assert!(
        wss_connect(server.addr, &first).await.is_ok(),
        "not before the signal"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rotated = false;
    for _ in 0..100 {
        if wss_connect(server.addr, &second).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "SIGHUP loads the new pair");
}

#[tokio::test]
async fn a_jwt_subject_holds_at_most_its_sessions() {
    let mut config = jwt_config(None);
    config.auth.jwt.max_sessions_per_subject = 1;
    let server = start(config).await;
    let mine = format!("Bearer {}", hs256(&good_claims(), HS_SECRET));
    let theirs = format!(
        "Bearer {}",
        hs256(
            &Claims {
                sub: "user-2",
                ..good_claims()
            },
            HS_SECRET
        )
    );
    let held = upgrade(server.addr, "", &[("Authorization", &mine)]).await;
    assert_eq!(held.0, 101);
    let before = refused(&server).await;
    let (status, head, _) = upgrade(server.addr, "", &[("Authorization", &mine)]).await;
    assert_eq!(status, 429, "{head}");
    assert_counted(&server, &before, "per_key").await;
    assert_eq!(
        upgrade(server.addr, "", &[("Authorization", &theirs)])
            .await
            .0,
        101,
        "another subject is not affected"
    );
}

#[tokio::test]
async fn a_client_faster_than_real_time_is_paced_not_buffered() {
    let mut config = test_config();
    config.ingress.max_burst_ms = 500;
    let server = start(config).await;
    let client = server.connect("").await;
    // Three seconds of audio, sent as fast as the socket takes it.
    let samples = vec![0i16; 48_000];
    let started = tokio::time::Instant::now();
    let result = stream_and_stop(client, &samples).await;
    let took = started.elapsed();
    assert_eq!(
        result.final_samples(),
        samples.len() as u64,
        "nothing is lost"
    );
    // Read at real time after the first 500 ms: at least 2.5 s for 3 s of audio.
    assert!(took >= Duration::from_millis(2_400), "took {took:?}");
}
