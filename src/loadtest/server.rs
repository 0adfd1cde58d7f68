//! The system under test: optionally spawned (`--spawn`: `voxflow emulator` + `voxflow serve`
//! from this very binary, on free loopback ports), and observed through `/proc` and `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// Linux's USER_HZ: `/proc/<pid>/stat` counts CPU time in these ticks (100 on every common
/// architecture; the kernel keeps the value fixed for user space).
const TICKS_PER_SEC: u64 = 100;

/// CPU time and resident memory of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu: Duration,
    pub rss_bytes: u64,
}

/// Read `/proc/<pid>/stat` (user + system time) and `/proc/<pid>/status` (VmRSS).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(ProcSample {
        cpu: Duration::from_millis(ticks * 1000 / TICKS_PER_SEC),
        rss_bytes: rss_kib * 1024,
    })
}

/// Seconds spent processing per stage, from voxflow's `/metrics`
/// (`voxflow_stage_processing_seconds_sum{stage=…}`).
pub async fn stage_seconds(metrics: &str) -> Option<BTreeMap<String, f64>> {
    let body = http_get(metrics, "/metrics").await.ok()?;
    let mut stages = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("voxflow_stage_processing_seconds_sum{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(stage) = labels
            .split(',')
            .find_map(|label| label.strip_prefix("stage=\""))
            .map(|s| s.trim_end_matches('"'))
        else {
            continue;
        };
        if let Ok(value) = value.trim().parse::<f64>() {
            stages.insert(stage.to_string(), value);
        }
    }
    Some(stages)
}

/// A plain HTTP/1.0 GET on loopback; the body, if the status is 200.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// `voxflow emulator` and `voxflow serve`, started for one run and killed when dropped.
pub struct Spawned {
    emulator: Child,
    server: Child,
    pub url: String,
    pub metrics: String,
    pub logs: PathBuf,
}

impl Spawned {
    /// Start both, sized for `clients`, and wait until the server is ready.
    ///
    /// # Errors
    /// When a process cannot start or the server is not ready within 30 s.
    pub async fn start(
        clients: usize,
        server_env: &[(String, String)],
        reference: bool,
    ) -> anyhow::Result<Spawned> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let [ws, metrics, speech] = free_ports()?;
        let logs = std::env::temp_dir().join(format!("voxflow-loadtest-{}", std::process::id()));
        std::fs::create_dir_all(&logs)?;
        let log = |name: &str| -> anyhow::Result<Stdio> {
            Ok(Stdio::from(std::fs::File::create(logs.join(name))?))
        };
        let emulator = Command::new(&exe)
            .args(["emulator", "--listen", &format!("127.0.0.1:{speech}")])
            .env("VOXFLOW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log("emulator.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `voxflow emulator`")?;
        // Room for every client (one address) and one Google stream each.
        let sessions = (clients + 100).to_string();
        let connections = clients.div_ceil(100).max(4).to_string();
        let mut server = Command::new(&exe);
        if reference {
            server.args([
                "reference-gateway",
                "--listen",
                &format!("127.0.0.1:{ws}"),
                "--upstream",
                &format!("http://127.0.0.1:{speech}"),
                "--connections",
                &connections,
            ]);
        } else {
            server
                .arg("serve")
                .env("VOXFLOW_SERVER__LISTEN", format!("127.0.0.1:{ws}"))
                .env("VOXFLOW_METRICS__LISTEN", format!("127.0.0.1:{metrics}"))
                .env("VOXFLOW_STT__ENGINE", "google")
                .env(
                    "VOXFLOW_STT__GOOGLE__ENDPOINT",
                    format!("http://127.0.0.1:{speech}"),
                )
                .env("VOXFLOW_STT__GOOGLE__AUTH", "none")
                .env("VOXFLOW_STT__GOOGLE__CONNECTIONS", &connections)
                .env("VOXFLOW_LIMITS__MAX_SESSIONS", &sessions)
                .env("VOXFLOW_LIMITS__MAX_SESSIONS_PER_IP", &sessions);
        }
        server.env("VOXFLOW_LOG", "warn");
        for (key, value) in server_env {
            server.env(key, value);
        }
        let server = server
            .stdout(Stdio::null())
            .stderr(log("server.log")?)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the server")?;
        let mut spawned = Spawned {
            emulator,
            server,
            url: format!("ws://127.0.0.1:{ws}/v1/stream"),
            metrics: format!("127.0.0.1:{metrics}"),
            logs,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = if reference {
                tokio::net::TcpStream::connect(("127.0.0.1", ws))
                    .await
                    .is_ok()
            } else {
                http_get(&spawned.metrics, "/readyz").await.is_ok()
            };
            if ready {
                return Ok(spawned);
            }
            if let Some(status) = spawned.server.try_wait()? {
                bail!(
                    "the server exited ({status}); see {}",
                    spawned.logs.join("server.log").display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the server was not ready within 30 s; see {}",
                    spawned.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn server_pid(&self) -> Option<u32> {
        self.server.id()
    }

    pub fn emulator_pid(&self) -> Option<u32> {
        self.emulator.id()
    }

    pub async fn stop(mut self) {
        let _ = self.server.kill().await;
        let _ = self.emulator.kill().await;
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

fn free_ports() -> anyhow::Result<[u16; 3]> {
    // Bound together so they differ; released just before the children bind them.
    let listeners = [(); 3].map(|()| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener?.local_addr()?.port();
    }
    Ok(ports)
}
