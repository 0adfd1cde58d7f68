//! Just enough of the W3C WebDriver protocol to drive headless Chromium through chromedriver.
//!
//! Every call is bounded: a chromedriver or Chromium that stops answering fails the test with
//! the command that hung and the tail of chromedriver's log, instead of hanging it. Dropping the
//! [`Browser`] kills chromedriver and every Chromium process it started (they share a process
//! group) and removes the throwaway profile.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Starting Chromium (new session) on a loaded 2-core machine.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Any other command: navigation of a local page, a short script.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    dir: PathBuf,
}

/// Whether Chromium and chromedriver are installed (`scripts/setup` installs them).
pub fn available() -> bool {
    std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists()
}

impl Browser {
    /// Start chromedriver and a headless Chromium whose microphone plays `wav` once.
    pub async fn launch(wav: &std::path::Path) -> Browser {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "voxflow-browser-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, inherited by Chromium: one kill ends them all.
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            dir,
        };
        let mut up = false;
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !up {
            browser.fail("chromedriver did not listen within 10 s");
        }
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--autoplay-policy=no-user-gesture-required".into(),
            "--use-fake-ui-for-media-stream".into(),
            "--use-fake-device-for-media-stream".into(),
            format!("--use-file-for-fake-audio-capture={}%noloop", wav.display()),
            format!("--user-data-dir={}", browser.dir.join("profile").display()),
        ];
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
            }}
        });
        let created = browser
            .call("POST", "/session", Some(capabilities), SESSION_TIMEOUT)
            .await;
        browser.session = match created["value"]["sessionId"].as_str() {
            Some(id) => id.to_string(),
            None => browser.fail(&format!("no WebDriver session: {created}")),
        };
        browser
    }

    pub async fn goto(&self, url: &str) {
        let path = format!("/session/{}/url", self.session);
        self.call("POST", &path, Some(json!({ "url": url })), CALL_TIMEOUT)
            .await;
    }

    /// Run `script` in the page and return its value.
    pub async fn eval(&self, script: &str) -> Value {
        let path = format!("/session/{}/execute/sync", self.session);
        let body = json!({ "script": script, "args": [] });
        self.call("POST", &path, Some(body), CALL_TIMEOUT).await["value"].clone()
    }

    /// One command, failing the test if it takes longer than `limit` or WebDriver reports an
    /// error.
    async fn call(&self, method: &str, path: &str, body: Option<Value>, limit: Duration) -> Value {
        let what = format!("{method} {path}");
        let answer = match tokio::time::timeout(limit, request(self.addr, method, path, body)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => self.fail(&format!("WebDriver {what}: {e}")),
            Err(_) => self.fail(&format!("WebDriver {what}: no answer within {limit:?}")),
        };
        if let Some(error) = answer["value"]["error"].as_str() {
            let message = answer["value"]["message"].as_str().unwrap_or("");
            self.fail(&format!("WebDriver {what}: {error}: {message}"));
        }
        answer
    }

    fn fail(&self, what: &str) -> ! {
        let log = std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "{what}\n--- chromedriver log (last lines) ---\n{}",
            tail.join("\n")
        );
    }
}

/// One HTTP/1.1 exchange on its own connection. The body is read by its Content-Length, so a
/// server that keeps the connection open anyway cannot stall us.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> std::io::Result<Value> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let start = end + 4;
            let complete = match length {
                Some(n) => buf.len() >= start + n,
                None => false, // Until the server closes.
            };
            if complete {
                let n = length.unwrap();
                return serde_json::from_slice(&buf[start..start + n])
                    .map_err(|e| bad(format!("{e}: {:?}", String::from_utf8_lossy(&buf))));
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            let text = String::from_utf8_lossy(&buf);
            let (_, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| bad(format!("not an HTTP response: {text:?}")))?;
            return serde_json::from_str(body).map_err(|e| bad(format!("{e}: {body:?}")));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SIGKILL the whole group: chromedriver, Chromium and its helpers. Nothing to flush.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("profile"));
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
